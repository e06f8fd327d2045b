"""Common Layer Interface (.cli) files, ASCII and binary: layers of contour polylines.

Header between $$HEADERSTART and $$HEADEREND ($$BINARY or $$ASCII, $$UNITS = mm per unit).
ASCII geometry: $$LAYER/z, $$POLYLINE/id,dir,n,x1,y1,..., $$HATCHES/... (ignored).
Binary geometry (little-endian, right after $$HEADEREND): a uint16 command code, then
127 layer (float32 z), 128 layer (uint16 z), 129 polyline (uint16 id, dir, n, 2n uint16
coordinates), 130 polyline (int32 id, dir, n, 2n float32), 131 hatches (uint16 id, n, 4n
uint16), 132 hatches (int32 id, n, 4n float32). Layout checked against the open-source
abfab3d CLISliceReader. dir: 0 clockwise (hole), 1 counter-clockwise (outer), 2 open.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from monitor.errors import MonitorError

OPEN = 2


@dataclass(frozen=True)
class Polyline:
    """One contour; points in mm, (N, 2)."""

    id: int
    dir: int
    points: npt.NDArray[np.float64]


@dataclass
class CliLayer:
    z_mm: float
    polylines: list[Polyline] = field(default_factory=list)


class SliceError(MonitorError):
    """A nominal geometry file that exists but cannot be used."""


def read_cli(path: Path) -> list[CliLayer]:
    """Parse a .cli file into layers (z and polylines in mm), in file order."""
    data = path.read_bytes()
    end = data.find(b"$$HEADEREND")
    if data.find(b"$$HEADERSTART") < 0 or end < 0:
        raise SliceError(f"{path}: not a CLI file (no $$HEADERSTART ... $$HEADEREND)")
    header = data[:end].decode("ascii", "replace")
    m = re.search(r"\$\$UNITS\s*/\s*([-+0-9.eE]+)", header)
    units = float(m.group(1)) if m else 1.0
    body = data[end + len(b"$$HEADEREND"):]
    try:
        if "$$BINARY" in header:
            return _binary(body, units)
        return _ascii(body.decode("ascii", "replace"), units)
    except (ValueError, struct.error, IndexError) as e:
        raise SliceError(f"{path}: malformed CLI geometry: {e}") from e


def _ascii(text: str, units: float) -> list[CliLayer]:
    layers: list[CliLayer] = []
    # Commands start with $$; their parameters may wrap over lines.
    for cmd in text.split("$$")[1:]:
        name, _, args = cmd.partition("/")
        name = name.strip().upper()
        if name == "LAYER":
            layers.append(CliLayer(float(args.split(",")[0]) * units))
        elif name == "POLYLINE":
            v = [float(t) for t in re.split(r"[,\s]+", args.strip()) if t]
            pid, d, n = int(v[0]), int(v[1]), int(v[2])
            pts = np.asarray(v[3:3 + 2 * n], np.float64).reshape(n, 2) * units
            if not layers:
                raise ValueError("$$POLYLINE before any $$LAYER")
            layers[-1].polylines.append(Polyline(pid, d, pts))
    return layers


def _binary(body: bytes, units: float) -> list[CliLayer]:
    layers: list[CliLayer] = []
    # Some writers put a line break after $$HEADEREND: start at the first valid command.
    pos = next((k for k in (0, 1, 2) if len(body) >= k + 2
                and struct.unpack_from("<H", body, k)[0] in (127, 128)), 0)
    while pos + 2 <= len(body):
        (cmd,) = struct.unpack_from("<H", body, pos)
        pos += 2
        if cmd in (127, 128):
            fmt = "<f" if cmd == 127 else "<H"
            (z,) = struct.unpack_from(fmt, body, pos)
            pos += struct.calcsize(fmt)
            layers.append(CliLayer(float(z) * units))
        elif cmd in (129, 130):
            ifmt, cdt = ("<3H", "<u2") if cmd == 129 else ("<3i", "<f4")
            pid, d, n = struct.unpack_from(ifmt, body, pos)
            pos += struct.calcsize(ifmt)
            size = 2 * n * np.dtype(cdt).itemsize
            if pos + size > len(body):
                raise ValueError(f"polyline of {n} points runs past the end of the file")
            pts = np.frombuffer(body, cdt, 2 * n, pos).astype(np.float64).reshape(n, 2) * units
            pos += size
            if not layers:
                raise ValueError("polyline before any layer")
            layers[-1].polylines.append(Polyline(int(pid), int(d), pts))
        elif cmd in (131, 132):
            ifmt, cdt = ("<2H", "<u2") if cmd == 131 else ("<2i", "<f4")
            _, n = struct.unpack_from(ifmt, body, pos)
            pos += struct.calcsize(ifmt) + 4 * n * np.dtype(cdt).itemsize
        else:
            raise ValueError(f"unknown binary command {cmd} at byte {pos - 2}")
    return layers


def write_cli(path: Path, layers: list[CliLayer], *, binary: bool, units: float = 1.0) -> None:
    """Write layers as a .cli file (long binary commands 127/130, or ASCII); for tests and
    for users converting slices."""
    head = f"$$HEADERSTART\n{'$$BINARY' if binary else '$$ASCII'}\n$$UNITS/{units}\n" \
           f"$$LAYERS/{len(layers)}\n$$HEADEREND"
    if not binary:
        lines = [head, "$$GEOMETRYSTART"]
        for layer in layers:
            lines.append(f"$$LAYER/{layer.z_mm / units:g}")
            for pl in layer.polylines:
                coords = ",".join(f"{v / units:g}" for v in pl.points.ravel())
                lines.append(f"$$POLYLINE/{pl.id},{pl.dir},{len(pl.points)},{coords}")
        lines.append("$$GEOMETRYEND\n")
        path.write_text("\n".join(lines), encoding="ascii")
        return
    out = bytearray(head.encode("ascii"))
    for layer in layers:
        out += struct.pack("<Hf", 127, layer.z_mm / units)
        for pl in layer.polylines:
            out += struct.pack("<H3i", 130, pl.id, pl.dir, len(pl.points))
            out += (pl.points / units).astype("<f4").tobytes()
    path.write_bytes(bytes(out))
