"""Fan-out and join: one branch per word, then a join that sums the branch values."""


def split(event, ctx):
    words = str(event).split()
    if not words:
        return {"words": 0, "letters": 0}
    return ctx.fan_out([("measure", w) for w in words], join="total")


def measure(word, ctx):
    return len(word)


def total(lengths, ctx):
    return {"words": len(lengths), "letters": sum(lengths)}
