"""Host driver: wire codec, transports, device emulator and the ``Device`` API.

``hbfp_hw.host.open(url)`` returns a :class:`Device` for ``emulate://`` (golden model),
``serial:///dev/ttyUSB0?baud=3000000`` (a board) or ``sim://`` (the RTL in a simulator).
"""

from .device import (ConfigMismatchError, Device, DeviceError, DeviceResetError,
                     FormatMismatchError, LinkError, ProtocolError, open)
from .transport import (FaultInjectingTransport, LoopbackTransport, SerialTransport,
                        Transport, TransportError)

__all__ = ["ConfigMismatchError", "Device", "DeviceError", "DeviceResetError",
           "FaultInjectingTransport", "FormatMismatchError", "LinkError", "ProtocolError",
           "LoopbackTransport", "SerialTransport",
           "Transport", "TransportError", "open"]
