"""senslora -> TRL's SFTTrainer, the whole path: chat data in TRL's format, per-matrix ranks from a
calibration sample of it, LoRA fine-tuning with those ranks, and the saved adapter checked.

    python examples/trl_sft.py                 # offline SmolLM2-135M-Instruct on the `chat` corpus, a few minutes on a CPU
    python examples/trl_sft.py --tiny          # a tiny random LLaMA built here, seconds (what CI runs)

Steps (all written into --out):
1. data.jsonl: chatterbot-corpus question -> answer pairs in TRL's conversational prompt-completion
   format ({"prompt": [user turn], "completion": [assistant turn]}); TRL then takes the loss on the
   completion (and so do senslora's gradient estimators, --estimator fisher).
2. allocation/: `senslora.allocate` with its default recipe on a calibration sample of that file
   (allocation.json, lora_config/, axolotl.yaml, llamafactory.yaml), as
   `senslora allocate --calib data.jsonl` does.
3. SFTTrainer trains the PEFT model `allocation.to_peft_model(...)` builds: LoRA with those ranks,
   its adapter initialised by the allocation's init (the default's `gradient`, from the calibration
   gradient); adapter/ is what trainer.save_model writes. (`peft_config=allocation.to_lora_config(...)`
   instead would train the same ranks from PEFT's zero init.)
4. The adapter is loaded back with PeftModel.from_pretrained and every module's rank compared with
   the allocation.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

TINY_TEMPLATE = (
    "{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<s> assistant {% endif %}"
)
NUMBERS = "one two three four five six seven eight nine ten".split()


def tiny_pairs(n: int) -> list[tuple[str, str]]:
    """Synthetic question -> answer pairs over a few words ("what comes after three ?" -> "four")."""
    return [(f"what comes after {NUMBERS[i % 9]} ?", NUMBERS[i % 9 + 1]) for i in range(n)]


def tiny_model_and_tokenizer():
    """A 2-block random LLaMA and a word-level tokenizer with a chat template, built in-process."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "<s>", "</s>", "user", "assistant", "what", "comes", "after", "?", *NUMBERS]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.chat_template = TINY_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(words),
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    return LlamaForCausalLM(config), tokenizer


def write_data(path: Path, pairs: list[tuple[str, str]]) -> None:
    """TRL's conversational prompt-completion format, one JSON object per line."""
    with open(path, "w", encoding="utf-8") as fh:
        for question, answer in pairs:
            row = {
                "prompt": [{"role": "user", "content": question}],
                "completion": [{"role": "assistant", "content": answer}],
            }
            fh.write(json.dumps(row) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="tiny random model and data (CI)")
    parser.add_argument("--model", default="smollm2", help="senslora model alias or HF folder (default smollm2)")
    parser.add_argument("--out", default="runs/trl-sft", help="output folder (default runs/trl-sft)")
    parser.add_argument("--pairs", type=int, default=None, help="training pairs (default 128; tiny 24)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps of 4 pairs (default 20; tiny 3)")
    parser.add_argument("--avg-rank", type=float, default=8, help="average LoRA rank (default 8; tiny 2)")
    parser.add_argument("--calib-samples", type=int, default=32, help="calibration examples (default 32)")
    args = parser.parse_args()

    import datasets
    import torch
    from peft import LoraConfig, PeftModel
    from trl import SFTConfig, SFTTrainer

    from senslora import allocate, load_examples, load_model, make_batches, sample_examples
    from senslora.core.peft_bridge import peft_ranks
    from senslora.data.corpora import chat_pairs

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    n_pairs = args.pairs or (24 if args.tiny else 128)
    steps = args.steps or (3 if args.tiny else 20)
    avg_rank = 2 if args.tiny else args.avg_rank

    # 1. The data, in TRL's conversational prompt-completion format.
    if args.tiny:
        model, tokenizer = tiny_model_and_tokenizer()
        pairs = tiny_pairs(n_pairs)
    else:
        model, tokenizer = load_model(args.model, kind="causal-lm", device="cpu")
        pairs = random.Random(0).sample(chat_pairs(), n_pairs)
    write_data(out / "data.jsonl", pairs)

    # 2. The allocation, from a calibration sample of the same file (loss on the completions).
    examples = sample_examples(load_examples(out / "data.jsonl"), args.calib_samples, seed=0)
    batches = make_batches(examples, tokenizer, kind="causal-lm", max_length=64, batch_size=8)
    alloc = allocate(model, batches, avg_rank=avg_rank, progress=False, model_name=args.model)
    base = LoraConfig(r=max(1, round(avg_rank)), lora_alpha=2 * avg_rank, task_type="CAUSAL_LM")
    alloc.save(out / "allocation", plot=False, base_config=base, overwrite=True, adapter_dir=(out / "adapter").resolve())
    ranks = alloc.ranks
    print(f"allocated {len(ranks)} matrices, ranks {min(ranks.values())}..{max(ranks.values())} (recipe {alloc.recipe})")

    # 3. TRL trains LoRA with those ranks, from the adapter the allocation initialised.
    peft_model = alloc.to_peft_model(model, base, batches=batches)
    print(f"adapter init {alloc.init}")
    config = SFTConfig(
        output_dir=str(out / "trainer"),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=2e-3 if not args.tiny else 1e-2,
        max_length=64,
        logging_steps=max(1, steps // 4),
        report_to="none",
        save_strategy="no",
        use_cpu=args.tiny or not torch.cuda.is_available(),  # else TRL takes the GPU (in bfloat16)
        gradient_checkpointing=False,
        disable_tqdm=True,
        seed=0,
    )
    trainer = SFTTrainer(
        model=peft_model,
        args=config,
        train_dataset=datasets.Dataset.from_json(str(out / "data.jsonl")),
        processing_class=tokenizer,
    )
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    trainer.save_model(str(out / "adapter"))
    print(f"trained {steps} steps with TRL's SFTTrainer: loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    # 4. The saved adapter keeps every per-module rank.
    if args.tiny:
        fresh, _ = tiny_model_and_tokenizer()
    else:
        fresh, _ = load_model(args.model, kind="causal-lm", device="cpu")
    loaded = PeftModel.from_pretrained(fresh, str(out / "adapter"))
    kept = peft_ranks(loaded)
    if kept != ranks:
        wrong = sorted(name for name in ranks if kept.get(name) != ranks[name])
        raise SystemExit(f"the saved adapter lost the allocated ranks of {len(wrong)} matrices, e.g. {wrong[0]}")
    print(f"every per-module rank kept: {len(kept)} matrices in {out / 'adapter'}")


if __name__ == "__main__":
    main()
