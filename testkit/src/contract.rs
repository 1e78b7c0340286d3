//! The API's OpenAPI document (`docs/openapi.json`, which the gateway's tests keep equal to
//! the one it serves) as a contract: [`check`] panics unless the document says a route may
//! answer a status with a body of that shape. The gateway's API tests and the end-to-end
//! tests put every answer they see through it.

use std::sync::LazyLock;

use serde_json::{json, Value};

/// The document, read once.
static DOCUMENT: LazyLock<Value> = LazyLock::new(|| {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"))
});

/// The document itself.
pub fn document() -> &'static Value {
    &DOCUMENT
}

/// The document's path template that `path` matches, if any.
pub fn template(path: &str) -> Option<String> {
    let segments: Vec<&str> = path.split('/').collect();
    let paths = DOCUMENT["paths"].as_object()?;
    paths.keys().find_map(|t| {
        let parts: Vec<&str> = t.split('/').collect();
        let matches = parts.len() == segments.len()
            && parts
                .iter()
                .zip(&segments)
                .all(|(p, s)| p == s || (p.starts_with('{') && !s.is_empty()));
        matches.then(|| t.clone())
    })
}

/// Panics unless the document says `method path` may answer `status`, with a body of media
/// type `media` that is `body` (JSON bodies are checked against their schema).
pub fn check(method: &str, path: &str, status: u16, media: Option<&str>, body: &Value) {
    let what = format!("{method} {path} answered {status} {body}");
    let refusal = json!({"$ref": "#/components/schemas/ErrorBody"});
    let Some(template) = template(path) else {
        // Not a route: the fallback's JSON refusal.
        assert_eq!(status, 404, "{what}");
        return validate(&refusal, body, &what);
    };
    let operation = &DOCUMENT["paths"][&template][method.to_lowercase()];
    if operation.is_null() {
        assert_eq!(status, 405, "{what}");
        return validate(&refusal, body, &what);
    }
    let response = &operation["responses"][status.to_string()];
    assert!(
        !response.is_null(),
        "{what}: the document has no {status} for {method} {template}"
    );
    let media = media.unwrap_or_else(|| panic!("{what}: no content type"));
    let schema = &response["content"][media]["schema"];
    assert!(
        !schema.is_null(),
        "{what}: the document gives no {media} body for {status}"
    );
    if media == "application/json" {
        validate(schema, body, &what);
    }
}

/// Panics unless `body` is valid under `schema` (a schema of the document).
fn validate(schema: &Value, body: &Value, what: &str) {
    let mut root = schema.clone();
    root["components"] = DOCUMENT["components"].clone();
    root["$schema"] = "https://json-schema.org/draft/2020-12/schema".into();
    let validator = jsonschema::validator_for(&root)
        .unwrap_or_else(|e| panic!("the document's schema for {what} does not compile: {e}"));
    let errors: Vec<String> = validator.iter_errors(body).map(|e| e.to_string()).collect();
    assert!(errors.is_empty(), "{what}: not as documented: {errors:?}");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_the_document_does_not_describe_is_refused() {
        let ok = json!({"status": "ok"});
        let json = Some("application/json");
        check("GET", "/healthz", 200, json, &ok);
        let cases = [
            (
                "an undocumented field",
                200,
                json!({"status": "ok", "x": 1}),
            ),
            ("a missing field", 200, json!({})),
            ("an undocumented status", 418, ok.clone()),
            (
                "an error without a code",
                400,
                json!({"error": {"message": "m"}}),
            ),
            (
                "an unknown error code",
                400,
                json!({"error": {"code": "oops", "message": "m"}}),
            ),
        ];
        for (what, status, body) in cases {
            let checked =
                std::panic::catch_unwind(|| check("GET", "/healthz", status, json, &body));
            assert!(checked.is_err(), "{what} passed the contract");
        }
        let unrouted = std::panic::catch_unwind(|| check("GET", "/v9/x", 200, json, &ok));
        assert!(
            unrouted.is_err(),
            "an answer from no route passed the contract"
        );
    }
}
