//! The entry grain: one `measure` per word of the input string, joined by `total`.

use sand_grain::{serve, Ctx, Output, Value};

fn split(event: Value, ctx: &Ctx) -> Result<Output, String> {
    let text = event.as_str().ok_or("split takes a JSON string")?;
    let words: Vec<(&str, Value)> = text
        .split_whitespace()
        .map(|w| ("measure", Value::from(w)))
        .collect();
    if words.is_empty() {
        return Ok(serde_json::json!({"words": 0, "letters": 0}).into());
    }
    Ok(ctx.fan_out(words, "total"))
}

fn main() {
    serve(split)
}
