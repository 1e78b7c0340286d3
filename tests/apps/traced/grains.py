"""Each grain's place in the execution's trace: `first` passes its traceparent on to
`second`, which answers both."""


def first(_, ctx):
    return ctx.next("second", ctx.trace)


def second(theirs, ctx):
    return [theirs, ctx.trace]
