//! Apps that the worker's tests and the benchmarks both run.

/// The benchmark chain's grains (Python): step `si` adds i and hands on to step i + 1, so that
/// input x answers x + 15 from `s1`; `whole` does the five steps in one grain.
pub const CHAIN_GRAINS: &str = r#"
"""The benchmark chain: step i adds i and hands on to step i + 1."""

def s1(event, ctx):
    return ctx.next("s2", event + 1)


def s2(event, ctx):
    return ctx.next("s3", event + 2)


def s3(event, ctx):
    return ctx.next("s4", event + 3)


def s4(event, ctx):
    return ctx.next("s5", event + 4)


def s5(event, ctx):
    return event + 5


def whole(event, ctx):
    """All five steps in one grain: the one-grain baseline that per-hop figures subtract."""
    return event + 15
"#;
