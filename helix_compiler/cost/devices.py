"""Device descriptions for the simulator: compute rates, memory, links.

Presets hold public spec-sheet numbers (dense tensor-core peaks, no sparsity) and achievable
fractions typical for large GEMMs and FlashAttention on that part; they are estimates, not
measurements. A ``"measured"`` device is loaded from a JSON profile (see
:func:`load_device_profile`; :meth:`DeviceSpec.to_profile` writes one).

Profile format (units in the key names)::

    {
      "name": "my-cluster",
      "peak_tflops": {"bf16": 148.0, "fp16": 148.0, "fp32": 74.0},
      "matmul_fraction": 0.8,
      "attention_fraction": 0.6,
      "memory_bandwidth_gb_s": 4000,
      "memory_gb": 96,
      "intra_node": {"bandwidth_gb_s": 450, "latency_us": 5},
      "inter_node": {"bandwidth_gb_s": 50, "latency_us": 15},
      "gpus_per_node": 8
    }
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import HelixError

DTYPES = ("fp8", "bf16", "fp16", "fp32")


@dataclass(frozen=True)
class DeviceSpec:
    name: str
    peak_flops: dict[str, float] = field(hash=False)  # dense FLOP/s per dtype
    matmul_fraction: float  # achievable fraction of peak for large GEMMs
    attention_fraction: float  # achievable fraction of peak for (flash) attention
    memory_bandwidth: float  # bytes/s (HBM)
    memory_bytes: float  # device memory
    intra_node_bandwidth: float  # bytes/s, one direction, per GPU (NVLink)
    intra_node_latency: float  # seconds per message
    inter_node_bandwidth: float  # bytes/s, one direction, per GPU (its NIC share)
    inter_node_latency: float  # seconds per message
    gpus_per_node: int = 8

    def __post_init__(self) -> None:
        if not self.peak_flops:
            raise HelixError(f"device {self.name!r}: peak_flops needs at least one dtype")
        for k, v in self.peak_flops.items():
            if k not in DTYPES or not v > 0:
                raise HelixError(f"device {self.name!r}: peak_flops[{k!r}]={v!r}; dtypes are "
                                 f"{DTYPES} with positive FLOP/s")
        for k in ("matmul_fraction", "attention_fraction"):
            v = getattr(self, k)
            if not 0 < v <= 1:
                raise HelixError(f"device {self.name!r}: {k}={v!r} must be in (0, 1]")
        for k in ("memory_bandwidth", "intra_node_bandwidth", "inter_node_bandwidth"):
            if not getattr(self, k) > 0:
                raise HelixError(f"device {self.name!r}: {k} must be > 0")
        for k in ("intra_node_latency", "inter_node_latency"):
            if getattr(self, k) < 0:
                raise HelixError(f"device {self.name!r}: {k} must be >= 0")

    def peak(self, dtype: str) -> float:
        try:
            return self.peak_flops[dtype]
        except KeyError:
            raise HelixError(f"device {self.name!r} has no peak for dtype={dtype!r}; it knows "
                             f"{sorted(self.peak_flops)}") from None

    def matmul_rate(self, dtype: str) -> float:
        return self.peak(dtype) * self.matmul_fraction

    def attention_rate(self, dtype: str) -> float:
        return self.peak(dtype) * self.attention_fraction

    def link(self, same_node: bool) -> tuple[float, float]:
        """(bandwidth bytes/s, latency s) between two GPUs."""
        if same_node:
            return self.intra_node_bandwidth, self.intra_node_latency
        return self.inter_node_bandwidth, self.inter_node_latency

    def to_profile(self) -> dict:
        return {
            "name": self.name,
            "peak_tflops": {k: v / 1e12 for k, v in self.peak_flops.items()},
            "matmul_fraction": self.matmul_fraction,
            "attention_fraction": self.attention_fraction,
            "memory_bandwidth_gb_s": self.memory_bandwidth / 1e9,
            "memory_gb": self.memory_bytes / 1e9,
            "intra_node": {"bandwidth_gb_s": self.intra_node_bandwidth / 1e9,
                           "latency_us": self.intra_node_latency * 1e6},
            "inter_node": {"bandwidth_gb_s": self.inter_node_bandwidth / 1e9,
                           "latency_us": self.inter_node_latency * 1e6},
            "gpus_per_node": self.gpus_per_node,
        }


def _preset(name, tflops, mm, attn, hbm_tb_s, mem_gb, nvl_gb_s, ib_gb_s, gpn=8,
            intra_lat_us=5.0, inter_lat_us=15.0) -> DeviceSpec:
    return DeviceSpec(
        name=name, peak_flops={k: v * 1e12 for k, v in tflops.items()},
        matmul_fraction=mm, attention_fraction=attn, memory_bandwidth=hbm_tb_s * 1e12,
        memory_bytes=mem_gb * 1e9, intra_node_bandwidth=nvl_gb_s * 1e9,
        intra_node_latency=intra_lat_us * 1e-6, inter_node_bandwidth=ib_gb_s * 1e9,
        inter_node_latency=inter_lat_us * 1e-6, gpus_per_node=gpn)


PRESETS: dict[str, DeviceSpec] = {
    # H20: 148 TFLOPS bf16 dense, 4.0 TB/s HBM3, 96 GB, NVLink 900 GB/s bidirectional
    # (450 per direction), one 400 Gb/s NIC per GPU (50 GB/s). Compute-poor and
    # bandwidth-rich, so GEMMs reach a high fraction of peak.
    "H20": _preset("H20", {"fp8": 296, "bf16": 148, "fp16": 148, "fp32": 74}, 0.80, 0.60,
                   4.0, 96, 450, 50),
    # H100 SXM: 989 TFLOPS bf16 dense, 3.35 TB/s, 80 GB, NVLink 900 GB/s bidirectional,
    # 400 Gb/s NDR per GPU.
    "H100": _preset("H100", {"fp8": 1979, "bf16": 989, "fp16": 989, "fp32": 495}, 0.65, 0.50,
                    3.35, 80, 450, 50),
    # A800 SXM: A100 compute (312 TFLOPS bf16), 2.0 TB/s, 80 GB, NVLink capped at 400 GB/s
    # bidirectional (200 per direction), 200 Gb/s HDR per GPU.
    "A800": _preset("A800", {"bf16": 312, "fp16": 312, "fp32": 156}, 0.70, 0.60,
                    2.0, 80, 200, 25),
    # H200 SXM: NVIDIA's H200 datasheet: the H100 SXM's compute (989 TFLOPS bf16 dense,
    # 1979 fp8), 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s bidirectional, 400 Gb/s per GPU.
    # Datasheet figures, not measured here; achievable fractions taken as the H100's.
    "H200": _preset("H200", {"fp8": 1979, "bf16": 989, "fp16": 989, "fp32": 495}, 0.65, 0.50,
                    4.8, 141, 450, 50),
    # B200 (HGX B200, per GPU): NVIDIA's HGX/DGX B200 datasheets: ~2.25 PFLOPS bf16 dense
    # (4.5 fp8; the sheets' headline numbers are with 2:4 sparsity, halved here), 192 GB HBM3e
    # at 8 TB/s (the B200 part; DGX B200 lists 1440 GB for 8 GPUs, i.e. 180 GB usable each),
    # NVLink 5 1.8 TB/s bidirectional (900 per direction), 400 Gb/s per GPU. "fp32" is TF32
    # dense (~1.1 PFLOPS), as the H100 preset's 495. Datasheet figures, not measured here;
    # the achievable fractions are assumed equal to the H100's.
    "B200": _preset("B200", {"fp8": 4500, "bf16": 2250, "fp16": 2250, "fp32": 1125}, 0.65, 0.50,
                    8.0, 192, 900, 50),
}


def load_device_profile(path: str | Path) -> DeviceSpec:
    """A ``"measured"`` device from a JSON profile (format in the module docstring)."""
    path = Path(path)
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise HelixError(f"cannot read device profile {str(path)!r}: {e}") from e
    try:
        return DeviceSpec(
            name=d.get("name", "measured"),
            peak_flops={k: float(v) * 1e12 for k, v in d["peak_tflops"].items()},
            matmul_fraction=float(d["matmul_fraction"]),
            attention_fraction=float(d["attention_fraction"]),
            memory_bandwidth=float(d["memory_bandwidth_gb_s"]) * 1e9,
            memory_bytes=float(d.get("memory_gb", 0)) * 1e9,
            intra_node_bandwidth=float(d["intra_node"]["bandwidth_gb_s"]) * 1e9,
            intra_node_latency=float(d["intra_node"]["latency_us"]) * 1e-6,
            inter_node_bandwidth=float(d["inter_node"]["bandwidth_gb_s"]) * 1e9,
            inter_node_latency=float(d["inter_node"]["latency_us"]) * 1e-6,
            gpus_per_node=int(d.get("gpus_per_node", 8)),
        )
    except KeyError as e:
        raise HelixError(
            f"device profile {str(path)!r} lacks key {e}; needed: peak_tflops, matmul_fraction, "
            "attention_fraction, memory_bandwidth_gb_s, intra_node{bandwidth_gb_s,latency_us}, "
            "inter_node{bandwidth_gb_s,latency_us} (optional: name, memory_gb, gpus_per_node)"
        ) from None


def get_device(device: str | DeviceSpec, *, profile: str | Path | None = None) -> DeviceSpec:
    """A preset by name (``PRESETS``: ``"H20"``, ``"H100"``, ``"H200"``, ``"B200"``,
    ``"A800"``; any case), ``"measured"`` with ``profile=`` a JSON file, or a
    :class:`DeviceSpec` (returned as is). Anything else: a ``HelixError`` listing them."""
    if isinstance(device, DeviceSpec):
        return device
    if device == "measured":
        if profile is None:
            raise HelixError("device='measured' needs profile=<path to a JSON device profile> "
                             "(see helix_compiler.cost.devices for the format)")
        return load_device_profile(profile)
    key = {k.lower(): k for k in PRESETS}.get(str(device).lower())
    if key is None:
        raise HelixError(f"unknown device {device!r}; presets are {sorted(PRESETS)} or "
                         "'measured' with profile=<json file>")
    return PRESETS[key]
