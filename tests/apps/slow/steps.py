"""Three steps of 150 ms each: input n answers n * 10 + 3."""

import time

STEP_SECONDS = 0.15


def one(n, ctx):
    time.sleep(STEP_SECONDS)
    return ctx.next("two", n * 10)


def two(n, ctx):
    time.sleep(STEP_SECONDS)
    return ctx.next("three", n + 1)


def three(n, ctx):
    time.sleep(STEP_SECONDS)
    return n + 2
