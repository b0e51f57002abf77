"""Load a BAGEL checkpoint folder (the official Hugging Face layout) into an Engine.

The model is built on the meta device, then every tensor of ema.safetensors / ae.safetensors is
read straight onto the target device in the target dtype and assigned in place: no float32 detour,
no accelerate dispatch, so the 29 GB of bf16 weights land on the GPU once. Every key and every
shape is checked first; errors name the file, the key and the expected shape. A Hugging Face repo
id can stand in for the folder where the machine is online (`pip install strokes[hub]`).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from strokes.model.generation.adapters import merge_adapter
from strokes.model.generation.engine import Engine
from strokes.model.network.bagel import Bagel
from strokes.model.network.compiled import CompileOptions
from strokes.model.network.config import BagelConfig, CheckpointError, load_config
from strokes.model.network.fp8 import WEIGHTS, Fp8Unavailable, quantize_decoder, require_fp8
from strokes.model.network.tokenizer import BagelTokenizer
from strokes.model.network.vae import AutoEncoder

REQUIRED_FILES = ("ema.safetensors", "ae.safetensors", "llm_config.json", "vit_config.json")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt"]
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_checkpoint(checkpoint: str | Path) -> Path:
    """A local folder, or a Hugging Face repo id downloaded to the local cache."""
    path = Path(checkpoint).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(f"{path}: a checkpoint must be a folder, not a file")
        missing = [name for name in REQUIRED_FILES if not (path / name).is_file()]
        if missing:
            raise CheckpointError(f"{path}: incomplete BAGEL checkpoint, missing {', '.join(missing)}")
        return path
    looks_like_repo = str(checkpoint).count("/") == 1 and not str(checkpoint).startswith((".", "/", "~"))
    if not looks_like_repo:
        raise CheckpointError(f"{path}: checkpoint folder not found")
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:
        raise CheckpointError(
            f"{checkpoint}: no such folder; to download it as a Hugging Face repo id, install strokes[hub]"
        ) from e
    return resolve_checkpoint(snapshot_download(repo_id=str(checkpoint), allow_patterns=HUB_PATTERNS))


def expected_tensors(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every tensor a checkpoint must provide for `module`: parameters and persistent buffers."""
    return {name: tuple(t.shape) for name, t in module.state_dict(keep_vars=True).items()}


def load_safetensors_into(
    module: nn.Module, path: Path, device: torch.device | str, dtype: torch.dtype
) -> None:
    """Assign every tensor of `path` to `module` (which may live on the meta device), after checking
    that the file has exactly the module's keys with exactly its shapes."""
    expected = expected_tensors(module)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    state = {}
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        keys = set(f.keys())
        missing = sorted(set(expected) - keys)
        if missing:
            shown = ", ".join(f"{k} {list(expected[k])}" for k in missing[:5])
            more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
            raise CheckpointError(f"{path}: missing {len(missing)} tensor(s): {shown}{more}")
        extra = sorted(keys - set(expected))
        if extra:
            more = f" (and {len(extra) - 5} more)" if len(extra) > 5 else ""
            raise CheckpointError(
                f"{path}: unexpected tensor(s) {', '.join(extra[:5])}{more}: "
                "the configuration files do not match the weights"
            )
        for key, shape in expected.items():
            found = tuple(f.get_slice(key).get_shape())
            if found != shape:
                raise CheckpointError(f"{path}: tensor {key} has shape {list(found)}, expected {list(shape)}")
        for key in expected:
            state[key] = f.get_tensor(key).to(dtype)
    module.load_state_dict(state, strict=True, assign=True)


def build_model(cfg: BagelConfig, attn_impl: str = "sdpa") -> tuple[Bagel, AutoEncoder]:
    """The model and the VAE as empty skeletons on the meta device."""
    with torch.device("meta"):
        return Bagel(cfg, attn_impl), AutoEncoder(cfg.vae)


def check_device(device: str | torch.device) -> torch.device:
    """The torch.device for `device`, refused when it does not exist; nothing is made current (no
    CUDA context is created on it: the leader of several devices checks its followers' this way)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CheckpointError(f"device {device} requested but CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CheckpointError(
                f"device {device} requested but only {torch.cuda.device_count()} GPUs exist"
            )
    return dev


def prepare_device(device: str | torch.device) -> torch.device:
    """The torch.device for `device`, made the calling thread's current CUDA device when it is one.

    CUDA objects created without an explicit device (streams, graphs, cuBLAS handles, memory
    statistics, a bare `.cuda()`) bind to the current device, which is cuda:0 unless set: a worker
    on cuda:1 would capture its graphs on the wrong GPU. The engine names its device everywhere it
    can; this covers what torch and libraries create implicitly. Call it on the thread that runs
    the model (the worker's torch thread loads and runs on the same one).
    """
    dev = check_device(device)
    if dev.type == "cuda":
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(dev)
    return dev


def default_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_engine(
    checkpoint: str | Path,
    device: str = "cpu",
    dtype: str | torch.dtype | None = None,
    *,
    attn_impl: str = "sdpa",
    batch_branches: bool = True,
    compile: CompileOptions | None = None,
    weights: str = "bf16",
    adapter: str | Path | None = None,
) -> Engine:
    """Load the checkpoint folder (or hub repo id) onto `device`. dtype defaults to bf16 on CUDA,
    float32 on CPU; the VAE always runs in float32 (as the reference runs it). `compile`: run the
    decoder's layers compiled (model/network/compiled.py); None: eager. `weights="fp8"`: the
    decoder layers' linear layers in FP8 (model/network/fp8.py; FP8-capable GPUs only). `adapter`: a
    LoRA adapter folder of `strokes train`, merged into the weights first (model/generation/adapters.py)."""
    if weights not in WEIGHTS:
        raise CheckpointError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    folder = resolve_checkpoint(checkpoint)
    dev = prepare_device(device)
    if weights == "fp8":
        try:
            require_fp8(dev)  # before the weights are read: fail in a second, not after a minute
        except Fp8Unavailable as e:
            raise CheckpointError(str(e)) from e
        if dtype not in (None, "bf16", "bfloat16", torch.bfloat16):
            raise CheckpointError(
                f"--weights fp8 computes with bfloat16 activations; --dtype {dtype} cannot go with it"
            )
    torch_dtype = DTYPES[dtype] if isinstance(dtype, str) else (dtype or default_dtype(dev))
    started = time.perf_counter()
    cfg = load_config(folder)
    tokenizer = BagelTokenizer.from_folder(folder)
    if len(tokenizer) > cfg.llm.vocab_size:
        raise CheckpointError(
            f"{folder}: the tokenizer has {len(tokenizer)} tokens but llm_config.json's "
            f"vocab_size is {cfg.llm.vocab_size}"
        )
    model, vae = build_model(cfg, attn_impl)
    load_safetensors_into(model, folder / "ema.safetensors", dev, torch_dtype)
    load_safetensors_into(vae, folder / "ae.safetensors", dev, torch.float32)
    if adapter is not None:
        merge_adapter(model, cfg, adapter)
    if weights == "fp8":
        quantize_decoder(model.language_model)
    model.language_model.compile_regions(compile)
    engine = Engine(model, vae, tokenizer, batch_branches=batch_branches)
    engine.weights = weights
    engine.load_seconds = time.perf_counter() - started
    return engine
