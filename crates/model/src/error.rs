//! `ModelError`: why a model (or its drift reference) cannot be fitted or used. A leaf module, so
//! `regression` and `drift` both use it without importing each other in a circle.

/// Why a model cannot be fitted or used.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The solver failed (for example on a degenerate data set).
    #[error("cannot fit a linear regression: {0}")]
    Fit(String),
    /// The logistic regression's solver failed, or the data cannot be classified (one class).
    #[error("cannot fit a logistic regression: {0}")]
    FitClassifier(String),
    /// Coefficients or intercept that are not finite, or a shape that does not fit.
    #[error("invalid model: {0}")]
    Invalid(String),
    /// ONNX Runtime is missing or failed (not the model's fault: the same model may work elsewhere).
    #[error("ONNX Runtime: {0}")]
    Runtime(String),
}
