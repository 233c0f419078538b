"""The Debian programs the benchmarks run (wrk, haproxy): installed, or extracted into .bin/.

A machine without apt (the lent GPU machine) gets them carried in a git-ignored .bin/ folder,
unpacked from the .deb files with `dpkg -x` (docs/benchmarks.md, bench-gpu): the binary under
.bin/usr/bin or .bin/usr/sbin, its shared libraries under .bin/usr/lib, found through
LD_LIBRARY_PATH.
"""

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

BIN_DIR = Path(__file__).resolve().parent.parent / ".bin"


@dataclass(frozen=True)
class Tool:
    """An executable and the environment variables it needs on top of this process's."""

    path: str
    env: dict[str, str] = field(default_factory=dict)

    def environ(self, **extra: str) -> dict[str, str]:
        """This process's environment with the tool's own settings and `extra` added."""
        return {**os.environ, **self.env, **extra}


def find_tool(name: str) -> Tool | None:
    """`name` on PATH or in /usr/sbin, else under .bin/ (with its libraries); None if absent."""
    installed = shutil.which(name) or shutil.which(name, path="/usr/sbin")
    if installed:
        return Tool(installed)
    for folder in ("usr/bin", "usr/sbin"):
        candidate = BIN_DIR / folder / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            libraries = sorted({str(p.parent) for p in BIN_DIR.glob("usr/lib/**/*.so*")})
            inherited = [os.environ["LD_LIBRARY_PATH"]] if os.environ.get("LD_LIBRARY_PATH") else []
            return Tool(str(candidate), {"LD_LIBRARY_PATH": os.pathsep.join(libraries + inherited)})
    return None
