"""glibc keeps a process's large freed blocks for reuse once asked (each check in a fresh
interpreter: the setting is process-wide), and gives them back when a trial ends."""

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# bytes in mmapped blocks (mallinfo2().hblkhd) while a fresh 64 MB tensor lives
PROBE = """
import ctypes, os, sys, torch
from trainables.memory import keep_freed_memory, release_memory

class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = Info
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.zeros(16 * 2**20).sum()  # a first 64 MB block, freed
t = torch.zeros(16 * 2**20)
live = libc.mallinfo2()
print(live.hblkhd >= 64 * 2**20)
live_rss = rss()
del t
held = rss() > live_rss - 32 * 2**20  # freed, its pages still in the process for the next step
release_memory()
print(held, rss() < live_rss - 32 * 2**20)  # released: the pages go back to the system
"""


def probe(mode: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_large_tensors_come_from_the_heap_once_freed_memory_is_kept():
    assert probe("default") == ["True", "False", "True"]  # mapped on their own, unmapped when freed (glibc's default)
    assert probe("keep") == ["False", "True", "True"]  # from the heap, kept when freed, given back when the trial ends
