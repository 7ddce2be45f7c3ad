//! The API's extractors: axum's `Json`, `Path` and `Query`, whose rejections (no JSON content
//! type, a body or parameter that does not parse) answer like every other error of the API:
//! 400 with an `ApiError` body, not axum's plain text with 415 or 422.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde::Serialize;
use taidon_api::{ApiError, ErrorKind};

/// A JSON request body, or a JSON answer.
pub(crate) struct Json<T>(pub T);

/// The parameters of the route's path.
pub(crate) struct Path<T>(pub T);

/// The query string's parameters.
pub(crate) struct Query<T>(pub T);

fn bad_input(what: &str, why: String) -> Response {
    let err = ApiError::new(ErrorKind::BadInput, format!("{what}: {why}"));
    (axum::http::StatusCode::BAD_REQUEST, axum::Json(err)).into_response()
}

impl<T, S> FromRequest<S> for Json<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match axum::Json::<T>::from_request(req, state).await {
            Ok(axum::Json(value)) => Ok(Json(value)),
            Err(rejection) => Err(bad_input("the request body", rejection.body_text())),
        }
    }
}

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        axum::Json(self.0).into_response()
    }
}

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(value)) => Ok(Path(value)),
            Err(rejection) => Err(bad_input("the path", rejection.body_text())),
        }
    }
}

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Query(value)) => Ok(Query(value)),
            Err(rejection) => Err(bad_input("the query string", rejection.body_text())),
        }
    }
}

#[cfg(test)]
mod tests {
    use axum::routing::{get, post};
    use axum::Router;
    use serde::Deserialize;

    use super::*;

    #[derive(Deserialize, Serialize)]
    struct Body {
        n: u32,
    }

    #[derive(Deserialize)]
    struct Limit {
        limit: Option<u32>,
    }

    async fn serve() -> String {
        let app = Router::new()
            .route("/body", post(|Json(b): Json<Body>| async move { Json(b) }))
            .route(
                "/path/{n}",
                get(|Path(n): Path<u32>, Query(q): Query<Limit>| async move {
                    Json(Body {
                        n: n + q.limit.unwrap_or(0),
                    })
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        url
    }

    /// Status, content type and the ApiError's kind and message.
    async fn answer(resp: reqwest::Response) -> (u16, String, serde_json::Value) {
        let status = resp.status().as_u16();
        let ctype = resp.headers()["content-type"].to_str().unwrap().to_owned();
        (status, ctype, resp.json().await.unwrap())
    }

    #[tokio::test]
    async fn rejections_are_api_errors() {
        let url = serve().await;
        let client = reqwest::Client::new();

        let ok = client
            .post(format!("{url}/body"))
            .json(&serde_json::json!({"n": 7}))
            .send()
            .await
            .unwrap();
        assert_eq!(answer(ok).await.2, serde_json::json!({"n": 7}));

        let cases = [
            // No content type: axum's 415.
            (
                client.post(format!("{url}/body")).body("{\"n\": 1}"),
                "the request body: ",
            ),
            // Not JSON: axum's 400 in plain text.
            (
                client
                    .post(format!("{url}/body"))
                    .header("content-type", "application/json")
                    .body("{"),
                "the request body: ",
            ),
            // JSON of the wrong shape: axum's 422.
            (
                client
                    .post(format!("{url}/body"))
                    .json(&serde_json::json!({"n": -1})),
                "the request body: ",
            ),
            (client.get(format!("{url}/path/x")), "the path: "),
            (
                client.get(format!("{url}/path/1?limit=no")),
                "the query string: ",
            ),
        ];
        for (req, prefix) in cases {
            let (status, ctype, err) = answer(req.send().await.unwrap()).await;
            assert_eq!(status, 400, "{err}");
            assert_eq!(ctype, "application/json");
            assert_eq!(err["kind"], "bad_input", "{err}");
            let message = err["message"].as_str().unwrap();
            assert!(message.starts_with(prefix), "{message}");
            assert!(message.len() > prefix.len() + 5, "{message}");
        }
    }
}
