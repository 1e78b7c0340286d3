//! The execution viewer: a web page at `/ui` that lists recent executions and draws one as a
//! timeline of its calls, from the `/v1` API.
//!
//! Its three files are built into the binary and hold no data, so they are served without the
//! token; the page itself sends the token on its `/v1` fetches. The page is served under a
//! strict content security policy: its own script and style only, fetches to this origin only,
//! no framing. It never renders what an execution holds as markup (see `ui/viewer.js`).

use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// What the viewer's responses may load and do.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'";

/// The viewer's routes, for the API's router to merge.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/ui", get(|| file(INDEX_HTML, "text/html; charset=utf-8")))
        .route("/ui/", get(|| file(INDEX_HTML, "text/html; charset=utf-8")))
        .route(
            "/ui/viewer.js",
            get(|| file(VIEWER_JS, "text/javascript; charset=utf-8")),
        )
        .route(
            "/ui/viewer.css",
            get(|| file(VIEWER_CSS, "text/css; charset=utf-8")),
        )
}

const INDEX_HTML: &str = include_str!("ui/index.html");
const VIEWER_JS: &str = include_str!("ui/viewer.js");
const VIEWER_CSS: &str = include_str!("ui/viewer.css");

async fn file(body: &'static str, content_type: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            // The files change with the binary: a browser asks again rather than run an old
            // script against a new API.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}
