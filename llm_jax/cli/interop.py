"""`llm-jax import-hf | export-hf`: Hugging Face checkpoints in and out."""
from __future__ import annotations

import argparse
from pathlib import Path


def add_commands(sub) -> None:
    imp = sub.add_parser("import-hf", help="a local Hugging Face GPT-2 / Llama / Mistral / Qwen2 checkpoint -> an "
                         "export dir")
    imp.add_argument("hf_dir", help="directory with config.json and *.safetensors, else pytorch_model.bin (read with "
                     "torch's weights-only unpickler: a pickle of anything but tensors is refused)")
    imp.add_argument("out", help="the llm_jax export directory to write (must not exist)")
    imp.add_argument("--tokenizer", help="tokenizer.model or tokenizer.json (default: the one in hf_dir)")
    imp.add_argument("--adapter", help="a PEFT LoRA adapter directory for this base, folded into the weights")
    imp.add_argument("--chat-template", default="", metavar="NAME",
                     help="the chat template the export records (llm_jax | sep | chatml; default: sep for a tokenizer "
                     "with [CLS]/[SEP], chatml for one with <|im_start|>/<|im_end|>, else llm_jax)")
    imp.set_defaults(fn=_import_hf)
    exp = sub.add_parser("export-hf", help="an llm_jax export (or run) directory -> a Hugging Face GPT-2 / Llama / "
                         "Qwen2 checkpoint (a LoRA run: a PEFT adapter)")
    exp.add_argument("checkpoint", help="an `llm-jax export` or run directory")
    exp.add_argument("out", help="directory to write config.json, model.safetensors and the tokenizer into")
    exp.set_defaults(fn=_export_hf)


def _import_hf(args: argparse.Namespace) -> int:
    from llm_jax.interop.hf import import_hf
    cfg = import_hf(Path(args.hf_dir), Path(args.out), Path(args.tokenizer) if args.tokenizer else None,
                    adapter=Path(args.adapter) if args.adapter else None, chat_template=args.chat_template)
    m = cfg.model
    print(f"imported a {m.n_layers}-layer, {m.d_model}-wide model (vocab {m.vocab_size}, chat template "
          f"{cfg.data.chat_template}) into {args.out}; use it with --checkpoint {args.out} or --set "
          f"checkpoint.init_from={args.out}")
    return 0


def _export_hf(args: argparse.Namespace) -> int:
    from llm_jax.interop.hf import export_hf
    hf = export_hf(Path(args.checkpoint), Path(args.out))
    if hf.get("peft_type"):
        print(f"wrote a Hugging Face PEFT adapter to {args.out} (peft.PeftModel.from_pretrained(base, ...), the base "
              f"exported with `llm-jax export-hf {hf['base_model_name_or_path']} BASE_OUT`)")
    else:
        print(f"wrote a Hugging Face checkpoint to {args.out} (transformers.AutoModelForCausalLM.from_pretrained)")
    return 0
