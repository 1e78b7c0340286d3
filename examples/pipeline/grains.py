"""A three-step chain. Each grain hands its result to the next with ctx.next; the last one
returns a plain value, which ends the execution and is the client's answer."""


def double(event, ctx):
    print(f"double: {event} (execution {ctx.exec}, attempt {ctx.attempt})")
    return ctx.next("inc", event * 2)


def inc(event, ctx):
    return ctx.next("square", event + 1)


def square(event, ctx):
    return event * event
