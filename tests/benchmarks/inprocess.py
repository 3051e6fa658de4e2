"""The in-process variants: the monolith (optimum's whole-model ONNX export in ONNX Runtime, numpy
greedy loop) and transformers' PyTorch generate on the same weights."""

from __future__ import annotations

import re
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from tests.benchmarks.common import BenchError, Runner, log, timing

# --------------------------------------------------------------------------------------------
# monolith: optimum's whole-model ONNX export, ONNX Runtime, numpy greedy loop


class Monolith:
    def __init__(self, model_path: Path):
        import onnxruntime as ort

        from functions.device import session_options

        # the stages' own session options, so both sides run ONNX Runtime the same way
        opts = session_options(None)
        self.session = ort.InferenceSession(str(model_path), opts, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: i for i in self.session.get_inputs()}
        self.output_names = [o.name for o in self.session.get_outputs()]
        for need in ("input_ids", "attention_mask"):
            if need not in self.inputs:
                raise BenchError(f"{model_path} has no input {need!r}; inputs: {sorted(self.inputs)}")
        if "logits" not in self.output_names:
            raise BenchError(f"{model_path} has no output 'logits'; outputs: {self.output_names}")
        self.past_names = sorted(
            (n for n in self.inputs if n.startswith("past_key_values.")),
            key=lambda n: (int(n.split(".")[1]), n.split(".")[2]),
        )
        # present.{i}.key|value -> past_key_values.{i}.key|value
        self.feedback = {}
        for idx, name in enumerate(self.output_names):
            if name.startswith("present."):
                past = "past_key_values." + name[len("present.") :]
                if past not in self.inputs:
                    raise BenchError(f"{model_path}: output {name} has no matching input {past}")
                self.feedback[past] = idx
        missing = set(self.past_names) - set(self.feedback)
        if missing:
            raise BenchError(f"{model_path}: no present output for {sorted(missing)}")
        self.logits_idx = self.output_names.index("logits")
        self.past_shape = {}
        for n in self.past_names:
            shape = self.inputs[n].shape  # (batch, heads, past, head_dim)
            if not (isinstance(shape[1], int) and isinstance(shape[3], int)):
                raise BenchError(f"{model_path}: cannot read heads/head_dim from {n} shape {shape}")
            self.past_shape[n] = (shape[1], shape[3])
        self.has_position_ids = "position_ids" in self.inputs

    def generate(self, prompts: np.ndarray, new_tokens: int) -> dict:
        b, p = prompts.shape
        feed: dict[str, np.ndarray] = {
            "input_ids": np.ascontiguousarray(prompts, dtype=np.int64),
            "attention_mask": np.ones((b, p), dtype=np.int64),
        }
        if self.has_position_ids:
            feed["position_ids"] = np.tile(np.arange(p, dtype=np.int64), (b, 1))
        for n in self.past_names:
            heads, dim = self.past_shape[n]
            feed[n] = np.zeros((b, heads, 0, dim), dtype=np.float32)
        out_tokens = np.empty((b, new_tokens), dtype=np.int64)

        t0 = time.perf_counter()
        outs = self.session.run(None, feed)
        nxt = outs[self.logits_idx][:, -1, :].argmax(axis=-1)
        out_tokens[:, 0] = nxt
        t_first = time.perf_counter()
        steps = [t_first]
        for step in range(1, new_tokens):
            total = p + step  # positions the model has seen once this token is fed
            feed = {
                "input_ids": nxt.reshape(b, 1).astype(np.int64, copy=False),
                "attention_mask": np.ones((b, total), dtype=np.int64),
            }
            if self.has_position_ids:
                feed["position_ids"] = np.full((b, 1), total - 1, dtype=np.int64)
            for n, idx in self.feedback.items():
                feed[n] = outs[idx]
            outs = self.session.run(None, feed)
            nxt = outs[self.logits_idx][:, -1, :].argmax(axis=-1)
            out_tokens[:, step] = nxt
            steps.append(time.perf_counter())
        t_end = steps[-1]

        r = timing(t0, [t_first] * b, [t_end] * b, t_end, [new_tokens] * b, gaps=np.diff(steps).tolist())
        r["tokens"] = out_tokens.tolist()
        return r


def open_monolith(args, bundle: Path, prompts: np.ndarray) -> Runner:
    path = bundle / "reference" / "model.onnx"
    log(f"[monolith] loading {path}")
    model = Monolith(path)
    return lambda c: model.generate(prompts[:c], args.new_tokens)


# --------------------------------------------------------------------------------------------
# hf: transformers PyTorch generate on the same weights


def load_hf_model(bundle: Path, manifest: dict, tmp: Path):
    """The causal LM with the bundle's weights: a seeded random model is rebuilt the way the
    export built it (the bundle keeps no PyTorch weights); a local HF directory is loaded as is."""
    from transformers import AutoModelForCausalLM

    mid = str(manifest.get("model", {}).get("id", ""))
    revision = str(manifest.get("model", {}).get("revision", ""))
    if mid.startswith("random-init:"):
        from export.random_init import ALIASES, SHAPES, make_random_model

        kind = mid.split(":", 1)[1]
        if kind not in SHAPES and kind not in ALIASES and not Path(kind).is_file():
            raise BenchError(
                f"the bundle was made from --random-init {kind}, which is not here any more; use --skip-hf"
            )
        m = re.fullmatch(r"seed-(\d+)", revision)
        seed = int(m.group(1)) if m else 0
        # the tokenizer the export was given (GPT-2's BPE) sets a GPT-2's vocabulary; other shapes
        # have theirs, and a tokenizer trained on the spot is trained again the same way
        given = manifest.get("export_args", {}).get("tokenizer_sha256")
        tok = bundle / "tokenizer.json" if given else None
        log(f"[hf] rebuilding random-init {kind} weights, seed {seed}")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            make_random_model(kind, tmp, tok, seed=seed)
        src = str(tmp)
    elif Path(mid).is_dir():
        src = mid
    else:
        src = mid  # a hub id: works when it is in the local HF cache or the hub is reachable
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(
                src, revision=None if src != mid else (revision or None), attn_implementation="eager"
            )
    except OSError as e:
        raise BenchError(f"could not load the PyTorch weights of {mid!r}: {e}; use --skip-hf") from e
    return model.eval()


class _TokenTimes:
    """A transformers streamer that only records when each new token arrives."""

    def __init__(self):
        self.times: list[float] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first puts the prompt
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def open_hf(args, bundle: Path, manifest: dict, prompts: np.ndarray, machine: dict) -> Runner:
    import torch
    import transformers

    machine.update(
        torch=torch.__version__, transformers=transformers.__version__, torch_threads=torch.get_num_threads()
    )
    with tempfile.TemporaryDirectory(prefix="tandem-bench-hf-") as tmp:
        model = load_hf_model(bundle, manifest, Path(tmp))
    eos = model.config.eos_token_id
    pad = eos if eos is not None else 0
    log(
        f"[hf] torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"attention {model.config._attn_implementation}"
    )

    def once(c: int) -> dict:
        ids = torch.from_numpy(np.ascontiguousarray(prompts[:c]))
        mask = torch.ones_like(ids)
        timer = _TokenTimes()
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t0 = time.perf_counter()
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                pad_token_id=pad,
                streamer=timer,
            )
            t_end = time.perf_counter()
        new = out[:, ids.shape[1] :]
        if new.shape[1] != args.new_tokens or len(timer.times) != args.new_tokens:
            raise BenchError(
                f"hf generate returned {new.shape[1]} tokens ({len(timer.times)} steps), "
                f"expected {args.new_tokens}"
            )
        r = timing(t0, [timer.times[0]] * c, [timer.times[-1]] * c, t_end, [args.new_tokens] * c)
        r["tokens"] = new.tolist()
        return r

    return once
