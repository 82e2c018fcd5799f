//! A response body that keeps a value alive until the body has been sent or dropped: the
//! audit ticket (a stream's record is written after its end, with its token counts) and the
//! listener's in-flight mark. It passes the body through untouched, its length included, so
//! a whole answer keeps its `Content-Length` (a body rebuilt from a stream of chunks would
//! go out with `Transfer-Encoding: chunked`). Hand-written: neither tower-http nor axum has
//! an on-drop hook for response bodies.

use std::pin::Pin;
use std::task::{Context, Poll};

use axum::body::{Body, Bytes, HttpBody};
use axum::response::Response;
use hyper::body::{Frame, SizeHint};

/// `body`, holding `_held` until it is dropped.
struct Held<T> {
    body: Body,
    _held: T,
}

impl<T: Send + Unpin + 'static> HttpBody for Held<T> {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The response with `held` kept alive until its body is gone.
pub(crate) fn hold<T: Send + Unpin + 'static>(response: Response, held: T) -> Response {
    response.map(|body| Body::new(Held { body, _held: held }))
}
