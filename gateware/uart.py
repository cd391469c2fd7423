"""UART PHY, 8N1 (Amaranth 0.5): receiver and transmitter with byte streams.

The bit period is ``divisor = round(clock_hz / baud)`` clocks (:func:`uart_divisor`;
3 Mbaud on the ULX3S FTDI link at 50 MHz is 17 clocks, 2 % fast, inside the 8N1
tolerance). The receiver synchronises ``rx`` with two flops, samples mid-bit, and
drops a byte whose stop bit is low (``frame_error`` strobes); a byte the consumer has
not taken when the next one completes is dropped (``overrun`` strobes). The frame
CRC of the wire protocol catches what the PHY lets through.
"""

from amaranth import Module, Signal, Cat
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

__all__ = ["UartRx", "UartTx", "uart_divisor"]


def uart_divisor(clock_hz: int, baud: int) -> int:
    """Clocks per bit; raises if the rounding error exceeds 2.5 % (8N1 budget / 2)."""
    if baud <= 0 or clock_hz <= 0:
        raise ValueError(f"clock_hz={clock_hz} and baud={baud} must be positive")
    div = round(clock_hz / baud)
    if div < 4:
        raise ValueError(f"baud={baud} needs at least 4 clocks per bit; clock_hz={clock_hz} "
                         f"gives {clock_hz / baud:.2f}")
    if abs(clock_hz / div - baud) / baud > 0.025:
        raise ValueError(f"baud={baud} at clock_hz={clock_hz}: divisor {div} is off by more "
                         f"than 2.5 %")
    return div


def _check_divisor(divisor: object) -> int:
    """Clocks per bit: an integer >= 4 (the receiver samples mid-bit)."""
    if not isinstance(divisor, int) or divisor < 4:
        raise ValueError(f"divisor={divisor!r} is out of range; accepted range is >= 4")
    return divisor


class UartRx(wiring.Component):
    """``rx`` line -> ``o`` byte stream."""

    rx: In(1, init=1)
    o: Out(stream.Signature(8))
    frame_error: Out(1)
    overrun: Out(1)

    def __init__(self, divisor: int) -> None:
        self.divisor = _check_divisor(divisor)
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        d = self.divisor
        s0 = Signal(init=1)
        s1 = Signal(init=1)
        m.d.sync += [s0.eq(self.rx), s1.eq(s0)]
        timer = Signal(range(d + 1))
        bits = Signal(8)
        n = Signal(4)
        m.d.sync += [self.frame_error.eq(0), self.overrun.eq(0)]
        with m.If(self.o.ready):
            m.d.sync += self.o.valid.eq(0)
        with m.FSM():
            with m.State("IDLE"):
                with m.If(~s1):
                    m.d.sync += timer.eq(d // 2 - 1)
                    m.next = "START"
            with m.State("START"):
                m.d.sync += timer.eq(timer - 1)
                with m.If(timer == 0):
                    with m.If(s1):           # glitch, not a start bit
                        m.next = "IDLE"
                    with m.Else():
                        m.d.sync += [timer.eq(d - 1), n.eq(0)]
                        m.next = "DATA"
            with m.State("DATA"):
                m.d.sync += timer.eq(timer - 1)
                with m.If(timer == 0):
                    m.d.sync += [bits.eq(Cat(bits[1:], s1)), timer.eq(d - 1), n.eq(n + 1)]
                    with m.If(n == 7):
                        m.next = "STOP"
            with m.State("STOP"):
                m.d.sync += timer.eq(timer - 1)
                with m.If(timer == 0):
                    with m.If(~s1):
                        m.d.sync += self.frame_error.eq(1)
                        m.next = "BREAK"
                    with m.Elif(self.o.valid & ~self.o.ready):
                        m.d.sync += self.overrun.eq(1)
                        m.next = "IDLE"
                    with m.Else():
                        m.d.sync += [self.o.payload.eq(bits), self.o.valid.eq(1)]
                        m.next = "IDLE"
            with m.State("BREAK"):  # wait for the line to go idle again
                with m.If(s1):
                    m.next = "IDLE"
        return m


class UartTx(wiring.Component):
    """``i`` byte stream -> ``tx`` line."""

    i: In(stream.Signature(8))
    tx: Out(1, init=1)

    def __init__(self, divisor: int) -> None:
        self.divisor = _check_divisor(divisor)
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        d = self.divisor
        shreg = Signal(10, init=0x3FF)
        timer = Signal(range(d))
        n = Signal(4)
        m.d.comb += self.tx.eq(shreg[0])
        with m.If(n == 0):
            m.d.comb += self.i.ready.eq(1)
            with m.If(self.i.valid):
                m.d.sync += [shreg.eq(Cat(0, self.i.payload, 1)), n.eq(10),
                             timer.eq(d - 1)]
        with m.Else():
            m.d.sync += timer.eq(timer - 1)
            with m.If(timer == 0):
                m.d.sync += [shreg.eq(Cat(shreg[1:], 1)), n.eq(n - 1), timer.eq(d - 1)]
        return m
