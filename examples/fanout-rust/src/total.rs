//! The join: the branches' lengths, in order, summed.

use sand_grain::{serve, Ctx, Output, Value};

fn total(lengths: Value, _: &Ctx) -> Result<Output, String> {
    let lengths = lengths
        .as_array()
        .ok_or("total takes the list of lengths")?;
    let letters: u64 = lengths.iter().filter_map(Value::as_u64).sum();
    Ok(serde_json::json!({"words": lengths.len(), "letters": letters}).into())
}

fn main() {
    serve(total)
}
