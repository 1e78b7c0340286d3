//! One branch: a word's length in characters.

use sand_grain::{serve, Ctx, Output, Value};

fn measure(word: Value, _: &Ctx) -> Result<Output, String> {
    let word = word.as_str().ok_or("measure takes a word")?;
    Ok(Value::from(word.chars().count()).into())
}

fn main() {
    serve(measure)
}
