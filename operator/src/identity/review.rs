//! Who presented a token: the API server's TokenReview, behind a trait so that tests and the
//! benchmark answer from recorded reviews.

use std::collections::HashMap;
use std::future::Future;

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use kube::api::{Api, PostParams};

use super::AUDIENCE;

/// Why a review could not be made (not: why a token is invalid, which is a status).
#[derive(Debug, thiserror::Error)]
#[error("TokenReview failed: {0}")]
pub struct ReviewError(pub String);

/// Reviews bearer tokens for the audience [`AUDIENCE`].
pub trait TokenReviewer: Send + Sync + 'static {
    /// The API server's verdict on `token`.
    fn review(
        &self,
        token: &str,
    ) -> impl Future<Output = Result<TokenReviewStatus, ReviewError>> + Send;
}

/// Creates `authentication.k8s.io/v1` TokenReviews (RBAC: `tokenreviews` `create`).
#[derive(Clone)]
pub struct KubeTokenReviewer {
    api: Api<TokenReview>,
}

impl KubeTokenReviewer {
    /// A reviewer using this client.
    pub fn new(client: kube::Client) -> Self {
        Self {
            api: Api::all(client),
        }
    }
}

impl TokenReviewer for KubeTokenReviewer {
    async fn review(&self, token: &str) -> Result<TokenReviewStatus, ReviewError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![AUDIENCE.to_owned()]),
            },
            ..TokenReview::default()
        };
        let answer = self
            .api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| ReviewError(e.to_string()))?;
        answer
            .status
            .ok_or_else(|| ReviewError("the API server returned no status".into()))
    }
}

/// Answers from recorded TokenReviews (what a real API server said about each token); unknown
/// tokens are unauthenticated.
#[derive(Debug, Clone, Default)]
pub struct RecordedReviewer {
    by_token: HashMap<String, TokenReviewStatus>,
}

impl RecordedReviewer {
    /// Records reviews (JSON bodies of `TokenReview` objects with `spec.token` and `status`).
    ///
    /// # Errors
    /// When a body does not parse or lacks the token or status.
    pub fn from_json<'a>(bodies: impl IntoIterator<Item = &'a str>) -> Result<Self, String> {
        let mut by_token = HashMap::new();
        for (i, body) in bodies.into_iter().enumerate() {
            let r: TokenReview =
                serde_json::from_str(body).map_err(|e| format!("review {i}: {e}"))?;
            let token = r.spec.token.ok_or(format!("review {i}: no spec.token"))?;
            let status = r.status.ok_or(format!("review {i}: no status"))?;
            by_token.insert(token, status);
        }
        Ok(Self { by_token })
    }

    /// Records one answer.
    pub fn insert(&mut self, token: &str, status: TokenReviewStatus) {
        self.by_token.insert(token.to_owned(), status);
    }
}

impl TokenReviewer for RecordedReviewer {
    async fn review(&self, token: &str) -> Result<TokenReviewStatus, ReviewError> {
        Ok(self
            .by_token
            .get(token)
            .cloned()
            .unwrap_or_else(|| TokenReviewStatus {
                authenticated: Some(false),
                error: Some("[invalid bearer token, token not recorded]".into()),
                ..TokenReviewStatus::default()
            }))
    }
}
