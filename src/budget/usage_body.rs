//! [`UsageBody`]: settles a retry's reservation from the usage its response reports, as the
//! body streams to the caller.

use std::pin::Pin;
use std::task::{Context, Poll, ready};

use bytes::Buf;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

use super::Budgets;
use super::llm::{LlmCost, UsageScan};
use crate::observe::RetryInfo;

pin_project! {
    /// A response body that settles what its call's last retry reserved from the cost
    /// budgets against the usage the body reports: the caller reads the body as it is
    /// (frames pass through unchanged, as they arrive), and when it ends, the usage it
    /// reported (read as [`LlmCost::usage_cost`] reads it, in bounded memory) is priced and
    /// the difference settled with [`Budgets::settle`]: refunded, or charged. The
    /// settlement is spawned on the tokio runtime; the body never waits for the store.
    /// Memory is bounded: a JSON body is kept up to 4 MiB (read at its end), an event
    /// stream one line and one event at a time, each up to 4 MiB (past it, that body or
    /// event is not read).
    ///
    /// Nothing is settled (the reservation stays: a worst case, it errs on the safe side)
    /// when the call reserved nothing for its last attempt (it succeeded at once, or its
    /// cost was unknown: then the body is only passed through), when the body breaks or is
    /// dropped before its end, or when it reports no usage or a model without a price.
    /// Only the last attempt is settled: the answers of earlier retries were failures that
    /// the layer dropped, and their reservations stay.
    ///
    /// ```
    /// use std::time::Duration;
    /// use bytes::Bytes;
    /// use http::{Request, Response};
    /// use http_body_util::{BodyExt, Full};
    /// use tower::{Service, ServiceBuilder, ServiceExt};
    /// use tower_retry_guard::budget::{Budgets, LlmCost, UsageBody};
    /// use tower_retry_guard::{RetryInfo, RetryLayer};
    ///
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    /// // Tokens as the unit: 20k tokens of retries per task.
    /// let prices = LlmCost::new().fallback(1_000_000, 1_000_000);
    /// let budgets = Budgets::none().task_cost(20_000, Duration::from_secs(3600));
    /// let layer = RetryLayer::new().budgets(budgets.clone()).llm_cost(prices.clone());
    /// let mut first = true;
    /// let mut svc = ServiceBuilder::new().layer(layer).service_fn(move |_: Request<String>| {
    ///     let status = if std::mem::take(&mut first) { 503 } else { 200 };
    ///     let body = r#"{"model":"m","usage":{"prompt_tokens":30,"completion_tokens":20}}"#;
    ///     let res = Response::builder().status(status).body(Full::new(Bytes::from(body)));
    ///     async move { Ok::<_, std::io::Error>(res.unwrap_or_default()) }
    /// });
    /// let request = Request::post("/v1/chat/completions")
    ///     .header("x-task-id", "task-1")
    ///     .body(r#"{"model":"m","max_tokens":10000,"messages":[]}"#.to_owned())?;
    /// let response = svc.ready().await?.call(request).await?;
    /// let info = response.extensions().get::<RetryInfo>().ok_or("no info")?;
    /// // The retry reserved 10,012 tokens (the body's 46 bytes / 4 + max_tokens)...
    /// assert_eq!((info.reserved(), info.task()), (10_012, Some("task-1")));
    /// let response = UsageBody::wrap(response, &budgets, &prices);
    /// // ...the caller reads the body as usual; at its end, the 50 tokens of its usage are
    /// // settled: 9,962 go back to the task's budget.
    /// let bytes = response.into_body().collect().await?.to_bytes();
    /// assert!(bytes.starts_with(b"{\"model\""));
    /// # Ok(())
    /// # }
    /// ```
    pub struct UsageBody<B> {
        #[pin]
        inner: B,
        // Boxed, and only when there is something to settle: otherwise a pass-through.
        settle: Option<Box<Settlement>>,
    }
}

/// What a settlement needs, and the usage read so far.
struct Settlement {
    scan: UsageScan,
    prices: LlmCost,
    budgets: Budgets,
    reserved: u64,
    task: Option<String>,
    user: Option<String>,
}

impl<B> UsageBody<B> {
    /// Wraps the body of a response whose call's [`RetryInfo`] is `info`; `budgets` are the
    /// layer's (or a clone), `prices` the table the usage is priced with.
    pub fn new(body: B, info: &RetryInfo, budgets: &Budgets, prices: &LlmCost) -> Self {
        let settle = (info.reserved() > 0).then(|| {
            Box::new(Settlement {
                scan: UsageScan::default(),
                prices: prices.clone(),
                budgets: budgets.clone(),
                reserved: info.reserved(),
                task: info.task().map(str::to_owned),
                user: info.user().map(str::to_owned),
            })
        });
        UsageBody {
            inner: body,
            settle,
        }
    }

    /// Wraps the body of an HTTP response, settling with the [`RetryInfo`] in its
    /// extensions (none: a pass-through).
    pub fn wrap(
        response: http::Response<B>,
        budgets: &Budgets,
        prices: &LlmCost,
    ) -> http::Response<UsageBody<B>> {
        let (parts, body) = response.into_parts();
        let body = match parts.extensions.get::<RetryInfo>() {
            Some(info) => UsageBody::new(body, info, budgets, prices),
            None => UsageBody {
                inner: body,
                settle: None,
            },
        };
        http::Response::from_parts(parts, body)
    }

    /// The wrapped body (nothing is settled then).
    pub fn into_inner(self) -> B {
        self.inner
    }
}

impl Settlement {
    /// The body ended: price the usage and settle, off the body's task.
    fn finish(mut self: Box<Self>) {
        self.scan.finish();
        let Some(actual) = self.scan.cost(&self.prices) else {
            return;
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            tracing::debug!(
                target: "tower_retry_guard",
                "no tokio runtime: the retry's cost is not settled"
            );
            return;
        };
        runtime.spawn(async move {
            let Settlement {
                budgets,
                reserved,
                task,
                user,
                ..
            } = *self;
            if let Err(error) = budgets
                .settle(task.as_deref(), user.as_deref(), reserved, actual)
                .await
            {
                tracing::debug!(
                    target: "tower_retry_guard",
                    %error,
                    reserved,
                    actual,
                    "the retry's cost could not be settled; its reservation stays"
                );
            }
        });
    }
}

impl<B> Body for UsageBody<B>
where
    B: Body,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let mut this = self.project();
        let polled = ready!(this.inner.as_mut().poll_frame(cx));
        let mut broken = false;
        if let Some(settle) = this.settle.as_mut() {
            match &polled {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        let chunk = data.chunk();
                        if chunk.len() == data.remaining() {
                            settle.scan.feed(chunk);
                        } else {
                            // Not contiguous (rare): not read, so not settled.
                            settle.scan.stop();
                        }
                    }
                }
                // A broken body settles nothing.
                Some(Err(_)) => broken = true,
                None => {}
            }
        }
        if broken {
            *this.settle = None;
        }
        // The end: the last frame (a reader may stop at `is_end_stream`), or none.
        if polled.is_none() || this.inner.is_end_stream() {
            if let Some(settle) = this.settle.take() {
                settle.finish();
            }
        }
        Poll::Ready(polled)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B: std::fmt::Debug> std::fmt::Debug for UsageBody<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UsageBody")
            .field("inner", &self.inner)
            .field("settles", &self.settle.is_some())
            .finish()
    }
}
