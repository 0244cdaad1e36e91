"""Devices and dtypes: which device a run uses, what it is called, and which dtype it computes in.

`dtype = "auto"` means one thing per use, both decided here:
- inference (`inference_dtype`): the fastest dtype the device computes natively (bf16 where it has it,
  else fp32), applied to the weights of an inference copy of the model;
- training (`autocast_dtype`): the autocast dtype of mixed precision, weights staying fp32: on CUDA bf16
  where the GPU computes it natively, else fp16 (with a gradient scaler); on a CPU fp32 (no autocast).
"""
import functools
import platform
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICES = ("auto", "cpu", "cuda", "cuda:N")
# CPU instructions that compute in bf16 / fp16; without them oneDNN converts to fp32 and back around
# every op, several times slower than plain fp32.
NATIVE_CPU_FLAGS = {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")}


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' is CUDA when available, else the CPU; 'cuda' is this process's GPU under torchrun.

    A CUDA device that is not there is a ValueError saying so, not a failure deep inside torch; as a
    setting's rule, `resolve_config` names the setting.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"not a device: expected one of {', '.join(DEVICES)}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("no CUDA GPU is available here: use --device=cpu (or auto)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"only {torch.cuda.device_count()} CUDA GPU(s) are visible here")
    elif device.type != "cpu":
        raise ValueError(f"unsupported device type: expected one of {', '.join(DEVICES)}")
    return device


@functools.cache
def read_cpuinfo() -> dict[str, str]:
    """The first processor's entries of /proc/cpuinfo ('model name', 'flags', ...); empty where there is none.
    Read once per process (a CPU's entries do not change); do not modify the returned dict."""
    path = Path("/proc/cpuinfo")
    if not path.is_file():
        return {}
    first_processor = path.read_text().split("\n\n")[0]
    return {key.strip(): value.strip() for key, _, value in
            (line.partition(":") for line in first_processor.splitlines())}


def cpu_instructions() -> str:
    """The widest vector instructions PyTorch's CPU kernels use here (AVX512, AVX2, ...; lowered by
    ATEN_CPU_CAPABILITY), with -BF16 where AVX512 comes with native bf16: CPUs of one model name can differ
    in both, and bf16 runs about twice as fast where it is native."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.startswith("AVX512") and is_native(torch.bfloat16, "cpu"):
        return f"{capability}-BF16"
    return capability


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU's model, its vector instructions and the threads torch uses: what a timing
    or a result ran on."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = read_cpuinfo().get("model name") or platform.processor() or platform.machine()
    return f"{cpu}, {cpu_instructions()}, {torch.get_num_threads()} threads"


def is_native(dtype: torch.dtype, device: torch.device | str) -> bool:
    """Whether `device` computes in `dtype` at full speed (fp32 always; bf16 / fp16 where the hardware has them)."""
    device = torch.device(device)
    if dtype == torch.float32:
        return True
    if device.type == "cuda":
        if dtype == torch.bfloat16:
            return torch.cuda.is_bf16_supported(including_emulation=False)
        return True
    return bool(set(NATIVE_CPU_FLAGS[dtype]) & set(read_cpuinfo().get("flags", "").split()))


def dtype_named(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: expected auto or one of {', '.join(DTYPES)}")
    return DTYPES[name]


def inference_dtype(dtype: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """'auto' -> bf16 where `device` computes it natively, else fp32; 'fp32' / 'bf16' / 'fp16' -> that dtype.

    fp16 is never chosen automatically: unlike bf16 it can overflow, and its agreement with fp32 is untested.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if is_native(torch.bfloat16, device) else torch.float32
    return dtype_named(dtype)


def autocast_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """Training's autocast dtype: 'auto' is bf16 on a GPU that computes it natively, fp16 on an older GPU
    (T4, RTX 20xx: bf16 there is emulated), fp32 (no autocast) on a CPU."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if is_native(torch.bfloat16, device) else torch.float16
    return dtype_named(dtype)
