"""Configuration of the BFP MAC array (:mod:`hbfp_hw.gateware.mac_array`).

One :class:`MacArrayConfig` fixes every width of the array; the gateware, the
testbenches and the manifest derive from it. Operands are HyperBlock tensors: one
shared exponent per ``tile x tile`` 2-D block, so the block length along the reduction
axis ``K`` is ``tile`` for both operands and either orientation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..formats import (BFPFormat, check_keys, exponent_bias, exponent_invalid_code,
                       fraction_bits, mantissa_max)
from ..gemm import DEFAULT_GUARD_BITS, accumulator_bits
from ..validate import check_int as _check_int

__all__ = ["MULTIPLIER_MAPPINGS", "DSP_WIDTH", "DUAL_FIELD", "DUAL_MAN_BITS", "MacArrayConfig"]

#: How the mantissa multipliers are built: ``lut`` (explicit shift-add partial
#: products, never inferred as DSP), ``dsp`` (one ``*`` per product, inferred as
#: MULT18X18D / SB_MAC16), ``dsp-packed`` (a block of rows x columns products in one
#: 18x18 multiplier where the widths allow it, see :attr:`MacArrayConfig.packing`).
MULTIPLIER_MAPPINGS = ("lut", "dsp", "dsp-packed")
#: Signed operand width of the target DSP multiplier (ECP5 MULT18X18D).
DSP_WIDTH = 18
#: The golden model converts the accumulator through float64.
MAX_ACC_BITS = 53
#: Mantissa width of the narrow mode of a ``dual_precision`` array (formats of at most
#: this many bits, both operands, run two products per multiplier).
DUAL_MAN_BITS = 4
#: Field spacing ``s`` of the narrow mode's operand packing: the middle field of
#: ``(a0 + a1 2**s)(b1 + b0 2**s)`` holds ``a0 b0 + a1 b1`` (``|.| <= 2 * 7 * 7 = 98``)
#: and the low field ``|a0 b1| <= 49``; both fit ``s`` bits signed.
DUAL_FIELD = 8


@dataclass(frozen=True)
class MacArrayConfig:
    """An immutable, validated MAC-array configuration.

    Parameters
    ----------
    rows, cols
        PE array shape, each in ``[1, 64]``; both must divide ``tile``.
    lanes
        Elements each PE multiplies per cycle (block dot-product width), in ``[1, 64]``;
        must divide ``tile``.
    tile
        HyperBlock tile edge ``T`` in ``[1, 64]``: operands carry one exponent per
        ``T x T`` tile, the K block length is ``T``.
    man_bits_a, man_bits_b
        Mantissa widths (sign included) of the two operands, in ``[2, 16]``.
    exp_bits
        Shared-exponent width of both operands, in ``[2, 10]``.
    k_max
        Largest reduction length the accumulator is sized for, in ``[1, 2**24]``.
    guard_bits
        Accumulator guard bits ``G`` in ``[0, 24]`` (see :func:`hbfp_hw.bfp_matmul`).
    mapping
        One of :data:`MULTIPLIER_MAPPINGS`.
    dual_precision
        Build the narrow mode too: jobs whose operands both have at most
        :data:`DUAL_MAN_BITS` mantissa bits (the ``frac`` header field) run two products
        per multiplier, ``2 * rows * cols * lanes`` MACs per cycle. Needs unpacked
        multipliers (``packing == (1, 1)``), ``man_bits_a, man_bits_b >= 4`` and
        ``2 * lanes`` dividing ``tile``.
    """

    rows: int = 4
    cols: int = 4
    lanes: int = 4
    tile: int = 8
    man_bits_a: int = 8
    man_bits_b: int = 8
    exp_bits: int = 8
    k_max: int = 1024
    guard_bits: int = DEFAULT_GUARD_BITS
    mapping: str = "dsp"
    dual_precision: bool = False

    def __post_init__(self) -> None:
        _check_int("rows", self.rows, 1, 64)
        _check_int("cols", self.cols, 1, 64)
        _check_int("lanes", self.lanes, 1, 64)
        _check_int("tile", self.tile, 1, 64)
        for name in ("rows", "cols", "lanes"):
            v = getattr(self, name)
            if self.tile % v:
                divs = [d for d in range(1, self.tile + 1) if self.tile % d == 0]
                raise ValueError(f"{name}={v} must divide tile={self.tile}; accepted values "
                                 f"are {divs}")
        _check_int("man_bits_a", self.man_bits_a, 2, 16)
        _check_int("man_bits_b", self.man_bits_b, 2, 16)
        _check_int("exp_bits", self.exp_bits, 2, 10)
        _check_int("k_max", self.k_max, 1, 2**24)
        _check_int("guard_bits", self.guard_bits, 0, 24)
        if self.mapping not in MULTIPLIER_MAPPINGS:
            raise ValueError(f"mapping={self.mapping!r} is not supported; accepted values are "
                             f"{', '.join(MULTIPLIER_MAPPINGS)}")
        if self.acc_bits > MAX_ACC_BITS:
            raise ValueError(
                f"accumulator of {self.acc_bits} bits (man_bits {self.man_bits_a}x"
                f"{self.man_bits_b}, tile {self.tile}, k_max={self.k_max}, guard_bits="
                f"{self.guard_bits}) is out of range; accepted range is [2, {MAX_ACC_BITS}]: "
                f"reduce k_max or guard_bits")
        if not isinstance(self.dual_precision, bool):
            raise TypeError(f"dual_precision must be a bool, got {self.dual_precision!r}")
        if self.dual_precision:
            if self.packing != (1, 1):
                raise ValueError(
                    f"dual_precision needs one product per multiplier; mapping="
                    f"{self.mapping!r} packs {self.packing} PEs (man_bits {self.man_bits_a}x"
                    f"{self.man_bits_b}): use mapping 'dsp' or 'lut'")
            for name in ("man_bits_a", "man_bits_b"):
                if getattr(self, name) < DUAL_MAN_BITS:
                    raise ValueError(f"dual_precision needs {name} >= {DUAL_MAN_BITS}, got "
                                     f"{getattr(self, name)}")
            if self.tile % (2 * self.lanes):
                raise ValueError(f"dual_precision needs 2 * lanes = {2 * self.lanes} to divide "
                                 f"tile={self.tile}")

    # -- derived constants --------------------------------------------------------
    @property
    def frac_a(self) -> int:
        return fraction_bits(self.man_bits_a)

    @property
    def frac_b(self) -> int:
        return fraction_bits(self.man_bits_b)

    @property
    def mmax_a(self) -> int:
        return mantissa_max(self.man_bits_a)

    @property
    def mmax_b(self) -> int:
        return mantissa_max(self.man_bits_b)

    @property
    def prod_bits(self) -> int:
        """Signed width of one mantissa product (symmetric ranges)."""
        return (self.mmax_a * self.mmax_b).bit_length() + 1

    @property
    def psum_bits(self) -> int:
        """Signed width of a block dot product ``P`` over ``tile`` elements."""
        return (self.tile * self.mmax_a * self.mmax_b).bit_length() + 1

    @property
    def acc_bits(self) -> int:
        """Accumulator width: :func:`hbfp_hw.gemm.accumulator_bits` of this config."""
        return accumulator_bits(self.man_bits_a, self.man_bits_b, self.tile, self.k_max,
                                self.guard_bits)

    @property
    def shift_max(self) -> int:
        """Alignment shifts are clamped here: ``>> shift_max`` leaves only the sign."""
        return self.acc_bits

    @property
    def shift_bits(self) -> int:
        return self.shift_max.bit_length()

    @property
    def exp_bias(self) -> int:
        return exponent_bias(self.exp_bits)

    @property
    def exp_invalid_code(self) -> int:
        return exponent_invalid_code(self.exp_bits)

    @property
    def windows(self) -> int:
        """Accumulators per PE: output ``rows x cols`` windows in a ``tile x tile`` tile."""
        return (self.tile // self.rows) * (self.tile // self.cols)

    @property
    def k_steps(self) -> int:
        """Cycles per block dot product (``tile / lanes``)."""
        return self.tile // self.lanes

    @property
    def k_steps_narrow(self) -> int:
        """Cycles per block dot product in the narrow mode of a ``dual_precision`` array
        (``tile / (2 lanes)``); ``k_steps`` otherwise."""
        return self.tile // (2 * self.lanes) if self.dual_precision else self.k_steps

    @property
    def mult_bits_a(self) -> int:
        """Signed width of a multiplier's row operand (without ``dsp-packed``): the
        mantissa, or with ``dual_precision`` at least a packed pair
        (``DUAL_FIELD + DUAL_MAN_BITS`` bits)."""
        if not self.dual_precision:
            return self.man_bits_a
        return max(self.man_bits_a, DUAL_FIELD + DUAL_MAN_BITS)

    @property
    def mult_bits_b(self) -> int:
        if not self.dual_precision:
            return self.man_bits_b
        return max(self.man_bits_b, DUAL_FIELD + DUAL_MAN_BITS)

    @property
    def packing(self) -> tuple[int, int]:
        """``(rows, cols)`` of the PE block one multiplier serves (``dsp-packed``).

        A multiplier computes ``(sum_i a_i 2**(i*cols*p)) * (sum_j b_j 2**(j*p))``,
        ``p = prod_bits``: every product ``a_i * b_j`` lands in its own ``p``-bit field
        ``i*cols + j`` (|product| < 2**(p-1), so the fields separate exactly). Both
        packed operands must fit the DSP's 18-bit signed inputs; of the shapes that fit,
        the one needing the fewest multipliers for this array is chosen. 4-bit
        mantissas: a 2x2 block, 4 products per MULT18X18D (operands 18 and 11 bits).
        """
        if self.mapping != "dsp-packed":
            return (1, 1)
        p = self.prod_bits
        best, cost = (1, 1), self.rows * self.cols
        for n in range(1, self.cols + 1):
            if (n - 1) * p + self.man_bits_b > DSP_WIDTH:
                break
            for r in range(1, self.rows + 1):
                if (r - 1) * n * p + self.man_bits_a > DSP_WIDTH:
                    break
                c = -(-self.rows // r) * -(-self.cols // n)
                if c < cost:
                    best, cost = (r, n), c
        return best

    @property
    def pack(self) -> int:
        """Array columns one multiplier serves (``packing[1]``)."""
        return self.packing[1]

    @property
    def pack_rows(self) -> int:
        """Array rows one multiplier serves (``packing[0]``)."""
        return self.packing[0]

    @property
    def macs_per_cycle(self) -> int:
        return self.rows * self.cols * self.lanes

    @property
    def macs_per_cycle_narrow(self) -> int:
        """Peak MACs per cycle of the narrow mode (``dual_precision``: twice
        ``macs_per_cycle``)."""
        return self.macs_per_cycle * (2 if self.dual_precision else 1)

    @property
    def multipliers(self) -> int:
        """Hardware multipliers (DSPs for the dsp mappings)."""
        return -(-self.rows // self.pack_rows) * -(-self.cols // self.pack) * self.lanes

    @property
    def mult_stages(self) -> int:
        """Registers from the registered multiplier operands to the registered product:
        1 for ``lut`` (one shift-add level), 3 for the DSP mappings: the multiplier's
        pipeline and product registers (on ECP5 the MULT18X18D's own pipeline/output
        registers, its input registers being the operand stage), then a fabric
        register that lands the product next to the adder tree. The route out of a
        DSP column is long (5.5 ns of the 14.4 ns critical path of the 8x8x8 array
        without it)."""
        return 1 if self.mapping == "lut" else 3

    @property
    def sum_stages(self) -> int:
        """Registers in the lane adder tree: 1, or 2 above 4 lanes (the unpacked fields
        and the first level of pairwise sums are registered; with 8 lanes the one-stage
        tree was the 10.8 ns critical path of the 8x8x8 array)."""
        return 1 if self.lanes <= 4 else 2

    @property
    def unpack_stages(self) -> int:
        """Registers between the products and the lane adder tree: 1 with
        ``dual_precision`` (the narrow mode's middle field or the full product,
        registered), else 0."""
        return int(self.dual_precision)

    @property
    def pe_latency(self) -> int:
        """PE pipeline depth: cycles from the PE inputs to the accumulator update."""
        return 4 + self.mult_stages + self.unpack_stages + self.sum_stages

    @property
    def cycles_per_tile_pair(self) -> int:
        """Compute cycles per (A tile, B tile) pair: ``windows * tile / lanes``."""
        return self.windows * self.k_steps

    def format_a(self) -> BFPFormat:
        """The HyperBlock format of a stored operand feeding port ``a``."""
        return BFPFormat(man_bits=self.man_bits_a, exp_bits=self.exp_bits,
                         block_shape=(self.tile, self.tile), block_axes=(0, 1), name="A")

    def format_b(self) -> BFPFormat:
        return BFPFormat(man_bits=self.man_bits_b, exp_bits=self.exp_bits,
                         block_shape=(self.tile, self.tile), block_axes=(0, 1), name="B")

    def replace(self, **changes: object) -> "MacArrayConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["derived"] = dict(
            acc_bits=self.acc_bits, prod_bits=self.prod_bits, psum_bits=self.psum_bits,
            shift_bits=self.shift_bits, windows=self.windows, k_steps=self.k_steps,
            pack=self.pack, pack_rows=self.pack_rows, macs_per_cycle=self.macs_per_cycle,
            multipliers=self.multipliers,
            mult_stages=self.mult_stages, sum_stages=self.sum_stages,
            pe_latency=self.pe_latency,
            exp_bias=self.exp_bias, exp_invalid_code=self.exp_invalid_code)
        if self.dual_precision:
            d["derived"].update(k_steps_narrow=self.k_steps_narrow,
                                macs_per_cycle_narrow=self.macs_per_cycle_narrow,
                                mult_bits_a=self.mult_bits_a, mult_bits_b=self.mult_bits_b)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MacArrayConfig":
        """Inverse of :meth:`to_dict` (``derived`` is ignored; unknown keys raise
        ``ValueError`` naming them and the accepted keys)."""
        if not isinstance(d, dict):
            raise ValueError(f"a MAC-array config must be a JSON object, got "
                             f"{type(d).__name__}")
        fields = [f.name for f in dataclasses.fields(cls)]
        check_keys("MAC-array config", d, fields, ("derived",))
        return cls(**{k: v for k, v in d.items() if k in fields})
