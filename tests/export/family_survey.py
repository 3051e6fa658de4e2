"""Which further transformers families the generic export serves without code of their own:

    python -m tests.export.family_survey [MODEL_TYPE ...]

For each model type (default: the decoder-only families of transformers with the embed_tokens /
layers / norm layout that this repository was checked against), a tiny random-weight config (2
layers, hidden 64, 4 heads, 2 KV heads) goes through the export's own checks, is split into 2
stages and compared with PyTorch (prefill + 20 greedy steps, batch 1 and a left-padded batch of 4).
Prints one line per type: exported with its max |logit difference|, or refused and why.
"""

from __future__ import annotations

import sys
import tempfile
import warnings
from pathlib import Path

DEFAULT = [
    "qwen3", "olmo", "olmo2", "starcoder2", "stablelm", "helium", "smollm3", "arcee", "apertus",
    "glm", "exaone4", "mixtral", "qwen2_moe", "qwen3_moe", "granite", "cohere", "gemma3_text",
    "seed_oss", "ministral", "dots1", "hunyuan_v1_dense",
]  # fmt: skip
TINY = dict(
    hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128,
    vocab_size=256, max_position_embeddings=256, initializer_range=0.3, pad_token_id=0, bos_token_id=1,
    eos_token_id=2, head_dim=16, moe_intermediate_size=64, num_experts=4, num_local_experts=4,
    num_experts_per_tok=2, tie_word_embeddings=False,
)  # fmt: skip


def survey(model_type: str) -> str:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from export.errors import ExportError
    from export.families import check_config, parts_of
    from export.stages import StageSpec
    from export.to_onnx import export_stage
    from export.verify import Link, verify

    try:
        config = AutoConfig.for_model(model_type, **TINY)
        check_config(config)
        torch.manual_seed(0)
        with tempfile.TemporaryDirectory() as d:
            AutoModelForCausalLM.from_config(config).save_pretrained(d)
            model = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
            parts = parts_of(model)
            links = []
            for k, (a, b) in enumerate([(0, 1), (1, 2)]):
                spec = StageSpec(k, a, b, 2)
                export_stage(parts, spec, Path(d) / spec.file, None)
                links.append(Link(Path(d) / spec.file, spec.input_name, spec.past_names()))
            r = verify(model, links, parts.shape)
    except ExportError as e:
        return f"refused: {e}".split("; tandem splits")[0]
    except Exception as e:  # what the survey is for: any failure is a finding
        return f"FAILED: {type(e).__name__}: {str(e)[:200]}"
    ok = r["max_abs_logit_diff"] <= 1e-4 and r["top1_agreement"] == 1.0
    return f"{'exported' if ok else 'WRONG'}: max |logit diff| {r['max_abs_logit_diff']:.1e}, top-1 {r['top1_agreement']:.0%}"


def main(argv: list[str]) -> int:
    import logging

    import torch

    torch.set_num_threads(1)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    for model_type in argv or DEFAULT:
        print(f"{model_type:<18} {survey(model_type)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
