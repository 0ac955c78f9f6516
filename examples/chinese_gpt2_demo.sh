#!/usr/bin/env bash
# The classic "Chinese GPT-2 on your own computer" demo, end to end with llm_jax.
#
#   1. a GPT-2 of the demo model's exact shape (gpt2-chinese-cluecorpussmall: 12 layers, 768 wide, 21,128-entry
#      BERT vocabulary), saved as the demo downloads it: config.json + pytorch_model.bin + vocab.txt. The weights
#      are random (they cannot be downloaded here); put the real three files in $WORK/hf and the same commands
#      are the real demo;
#   2. `llm-jax import-hf`: the pickle through PyTorch's weights-only unpickler, the WordPiece tokenizer, and the
#      `sep` chat template recorded in the export;
#   3. `llm-jax sample --trace`: "[CLS]今天天气真", greedily, 20 steps, each token with its probability and the
#      top-5 alternatives, going on past [SEP] as the classic loop does;
#   4. a brief SFT on Chinese Q&A (../shared/data/sft_zh_qa_hikariming) through the sep template
#      ([CLS] question [SEP] answer [SEP]), then `llm-jax chat` with the result.
#
# Usage: examples/chinese_gpt2_demo.sh [WORK_DIR]   (default runs/chinese_gpt2_demo; needs pip install -e '.[hf]')
# Data: $LLM_JAX_DATA, else ../shared/data beside the repository. About 10 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-runs/chinese_gpt2_demo}
DATA=${LLM_JAX_DATA:-$(cd .. && pwd)/shared/data}
DEMO=$DATA/zh_gpt2_chinese_demo
PYTHON=${PYTHON:-python}
LLM_JAX="$PYTHON -m llm_jax"
for f in config.json vocab.txt tokenizer_config.json; do
  [[ -f $DEMO/$f ]] || { echo "chinese_gpt2_demo: $DEMO/$f is missing (set LLM_JAX_DATA)" >&2; exit 2; }
done
mkdir -p "$WORK"

if [[ ! -f $WORK/hf/pytorch_model.bin ]]; then
  echo "== 1. a random-weight GPT-2 of the demo's shape -> $WORK/hf (config.json, pytorch_model.bin, vocab.txt)"
  $PYTHON - "$DEMO" "$WORK/hf" <<'PY'
import json, shutil, sys
from pathlib import Path
import torch, transformers
demo, out = Path(sys.argv[1]), Path(sys.argv[2])
fields = {k: v for k, v in json.loads((demo / "config.json").read_text()).items() if k != "architectures"}
torch.manual_seed(0)
model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**fields, bos_token_id=101, eos_token_id=102))
out.mkdir(parents=True, exist_ok=True)
model.config.save_pretrained(out)
# transformers 5 writes safetensors only; the demo's checkpoint is the pickle transformers 4 wrote
torch.save(model.state_dict(), out / "pytorch_model.bin")
for name in ("vocab.txt", "tokenizer_config.json"):
    shutil.copy(demo / name, out / name)
print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
PY
fi

[[ -d $WORK/export ]] || { echo "== 2. import"; $LLM_JAX import-hf "$WORK/hf" "$WORK/export"; }

echo "== 3. greedy, 20 steps, traced"
$LLM_JAX sample --checkpoint "$WORK/export" --prompt "[CLS]今天天气真" --temperature 0 --max-tokens 20 --trace \
  --ignore-eos

echo "== 4. a brief SFT through the sep template; what it now believes after a question's [SEP]; then chat"
$LLM_JAX train --config sft_chinese_gpt2_demo --run-dir "$WORK/sft" --set "checkpoint.init_from=$WORK/export" \
  --set "data.data_dir=$DATA"
# From random weights, 40 steps reach the unigram stage: the most frequent answer token first ([UNK]: capitalised
# English words, outside the lower-case vocabulary, as for the real model), which decodes to nothing.
$LLM_JAX sample --checkpoint "$WORK/sft" --prompt "[CLS]今天天气怎么样？[SEP]" --temperature 0 --max-tokens 5 --trace
printf '今天天气怎么样？\n\n' | $LLM_JAX chat --checkpoint "$WORK/sft" --temperature 0 --max-tokens 40
