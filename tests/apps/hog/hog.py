"""Writes `event` MiB of memory, then answers how much it wrote."""


def hog(mib, ctx):
    block = b"x" * (mib << 20)
    return len(block) >> 20
