"""Peak rates of the GPU at hand from its own attributes (SM count, clocks, bus width), not from its name.

A name table prices an H100 PCIe (114 SMs, 1.755 GHz, HBM2e at 2.0 TB/s) or NVL as the SXM part
(132 SMs, 1.98 GHz, 3.35 TB/s): 30-65% too fast. The attributes give each part its own numbers:

- tensor FLOP/s = SMs x dense FLOP per clock per SM x tensor clock. Per SM and clock (dense, no sparsity):
  sm_80 2048 bf16 (A100: 108 SMs x 1.41 GHz = 312 TFLOP/s), no fp8; sm_90 4096 bf16 and 8192 fp8
  (H100 SXM: 132 x 1.83 GHz = 989 / 1979 TFLOP/s; PCIe: 114 x 1.62 GHz = 756 / 1513).
- The tensor clock: the device reports its maximum boost clock (cudaDevAttrClockRate: SXM 1.98 GHz, PCIe
  1.755 GHz), and NVIDIA states Hopper's tensor peaks at a lower clock, 0.924 of it on both parts (1.83 of
  1.98, 1.62 of 1.755: what tensor-core load sustains at the power limit). `TENSOR_CLOCK_RATIO` applies
  that ratio; on a part held to a lower power limit (H100 NVL, 400 W: 835 stated vs 892 from this
  ratio) the figure stays an upper bound, still far below the SXM's.
- FP32 (no tensor cores) runs at the maximum clock: 2 FLOP x 128 lanes per SM on sm_90 (SXM 66.9 TFLOP/s),
  64 lanes on sm_80.
- HBM bytes/s = 2 (double data rate) x memory clock x bus width / 8 (SXM: 2 x 2.619 GHz x 5120 bit / 8 =
  3.35 TB/s; PCIe: 1.593 GHz, 2.04 TB/s).

torch gives the SM count and the capability; the clocks and the bus width come from cuda-python's runtime
API (`pip install helios_rt[cuda]`). Without it, a name table stands in, and the spec says so.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from .projection import H100_SXM, DeviceSpec


@dataclass(frozen=True)
class ArchRates:
    """Dense FLOP per clock per SM of one compute capability, and the tensor clock's share of the max clock."""

    bf16: int
    fp8: int  # 0: no fp8 tensor cores
    fp32: int
    tensor_clock_ratio: float


ARCH_RATES: dict[tuple[int, int], ArchRates] = {
    (8, 0): ArchRates(bf16=2048, fp8=0, fp32=128, tensor_clock_ratio=1.0),  # A100: 312 TFLOP/s at its 1.41 GHz
    (9, 0): ArchRates(bf16=4096, fp8=8192, fp32=256, tensor_clock_ratio=1830 / 1980),
}


def arch_rates(major: int, minor: int) -> ArchRates:
    if (major, minor) not in ARCH_RATES:
        known = ", ".join(f"sm_{a}{b}" for a, b in ARCH_RATES)
        raise ValueError(f"no per-SM tensor rates for sm_{major}{minor} (known: {known}); add them to ARCH_RATES "
                         "from the vendor's architecture whitepaper")  # fmt: skip
    return ARCH_RATES[(major, minor)]


def peak_rates(
    sm_count: int, sm_clock_khz: float, mem_clock_khz: float, bus_width_bits: int, major: int, minor: int
) -> tuple[float, float, float]:
    """(dense bf16 FLOP/s, dense fp8 FLOP/s, HBM bytes/s) with the tensor cores at `sm_clock_khz`."""
    arch = arch_rates(major, minor)
    clock_hz = sm_clock_khz * 1e3
    hbm = 2 * mem_clock_khz * 1e3 * bus_width_bits / 8
    return sm_count * arch.bf16 * clock_hz, sm_count * arch.fp8 * clock_hz, hbm


@dataclass(frozen=True)
class DeviceAttributes:
    """What the device says about itself (the CUDA runtime's units: kHz, bits)."""

    name: str
    sm_count: int
    major: int
    minor: int
    max_clock_khz: int
    mem_clock_khz: int
    bus_width_bits: int


def spec_from_attributes(a: DeviceAttributes) -> DeviceSpec:
    """The cost model's spec of a device: tensor peaks at the tensor clock, FP32 at the max clock."""
    arch = arch_rates(a.major, a.minor)
    bf16, fp8, hbm = peak_rates(a.sm_count, a.max_clock_khz * arch.tensor_clock_ratio, a.mem_clock_khz,
                                a.bus_width_bits, a.major, a.minor)  # fmt: skip
    fp32 = a.sm_count * arch.fp32 * a.max_clock_khz * 1e3
    return DeviceSpec(a.name, bf16 / 1e12, fp8 / 1e12, fp32 / 1e12, hbm / 1e12, sm=(a.major, a.minor))


# cudaDeviceAttr names of what torch's device properties lack
RUNTIME_ATTRIBUTES = {"max_clock_khz": "cudaDevAttrClockRate", "mem_clock_khz": "cudaDevAttrMemoryClockRate",
                      "bus_width_bits": "cudaDevAttrGlobalMemoryBusWidth"}  # fmt: skip
AttributeSource = Callable[[str, int], int]  # (cudaDeviceAttr name, device index) -> value


def cuda_runtime_source() -> AttributeSource:
    """cuda-python's `cudaDeviceGetAttribute`; ImportError (with the install command) when it is absent."""
    try:
        from cuda.bindings import runtime
    except ImportError as err:
        raise ImportError("cuda-python is not installed (the SM and memory clocks and the bus width come from its "
                          "runtime API): pip install 'cuda-python>=12' (or helios_rt[cuda])") from err  # fmt: skip

    def get(name: str, index: int) -> int:
        err, value = runtime.cudaDeviceGetAttribute(getattr(runtime.cudaDeviceAttr, name), index)
        if err != runtime.cudaError_t.cudaSuccess:
            raise RuntimeError(f"cudaDeviceGetAttribute({name}, {index}) failed: {err}")
        return int(value)

    return get


def read_attributes(index: int, source: AttributeSource | None = None, props=None) -> DeviceAttributes:
    """Device `index`'s attributes: SM count, name and capability from torch (or `props`, any object with
    torch's property names), clocks and bus width from `source` (default: cuda-python's runtime)."""
    if props is None:
        import torch

        props = torch.cuda.get_device_properties(index)
    source = source or cuda_runtime_source()
    read = {field: source(attr, index) for field, attr in RUNTIME_ATTRIBUTES.items()}
    return DeviceAttributes(props.name, props.multi_processor_count, props.major, props.minor, **read)


# The stand-in when the attributes cannot be read: datasheet numbers, most specific name first.
NAME_TABLE: tuple[tuple[str, DeviceSpec], ...] = (
    ("H100 PCIe", DeviceSpec("H100 PCIe", bf16_tflops=756.0, fp8_tflops=1513.0, fp32_tflops=51.2, hbm_tbps=2.0)),
    ("H100 NVL", DeviceSpec("H100 NVL", bf16_tflops=835.0, fp8_tflops=1671.0, fp32_tflops=60.0, hbm_tbps=3.9)),
    ("H200", DeviceSpec("H200", bf16_tflops=989.0, fp8_tflops=1979.0, fp32_tflops=67.0, hbm_tbps=4.8)),
    ("H100", H100_SXM),
)


def spec_by_name(name: str) -> DeviceSpec | None:
    return next((spec for key, spec in NAME_TABLE if key in name), None)


def device_spec_for(index: int, source: AttributeSource | None = None, props=None) -> tuple[DeviceSpec, str]:
    """The spec of CUDA device `index` from its attributes, and a note saying where the rates came from
    (a name-table fallback is labelled as one, with the reason)."""
    try:
        attrs = read_attributes(index, source, props)
        spec = spec_from_attributes(attrs)
    except (ImportError, RuntimeError, ValueError) as err:
        import torch

        name = props.name if props is not None else torch.cuda.get_device_name(index)
        spec = spec_by_name(name)
        why = str(err).splitlines()[0]
        if spec is None:
            return H100_SXM, f"{name}: rates not readable ({why}) and not in the name table: priced as an H100 SXM"
        return spec, f"{name}: FALLBACK name table ({spec.name} datasheet), rates not read from the device: {why}"
    return spec, (f"{attrs.name}: rates from the device's attributes ({attrs.sm_count} SMs, "
                  f"{attrs.max_clock_khz / 1e6:.3f} GHz max clock, {attrs.bus_width_bits}-bit bus at "
                  f"{attrs.mem_clock_khz / 1e6:.3f} GHz): {spec.bf16_tflops:.0f} TFLOP/s bf16, "
                  f"{spec.fp8_tflops:.0f} fp8, {spec.hbm_tbps:.2f} TB/s")  # fmt: skip
