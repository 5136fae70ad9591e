"""The command line: the parser and subcommands (:mod:`.main`, the ``senslora`` console script and
``python -m senslora``) and the recipes behind them (:mod:`.recipes`), the only code that reads
parsed arguments. The top layer: it may import every other one.
"""
