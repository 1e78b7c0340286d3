"""The last step of the shell app: counts the letters of what the shell grain shouted."""


def count(shouted, ctx):
    text = shouted["text"]
    letters = sum(c.isalpha() for c in text)
    return {"text": text, "letters": letters, "host": shouted["host"]}
