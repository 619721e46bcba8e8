"""layergrad: gradients of a served VGG16 network, as numpy arrays.

::

    import layergrad
    from layergrad import ClassScore

    with layergrad.Client("127.0.0.1:50051") as client:
        info = client.model_info()
        saliency = client.input_gradient("cat.jpg", ClassScore("fc8", classes=[281]))
        grads = client.parameter_gradients("cat.jpg", ClassScore("fc8", classes=[281]))

Errors are :class:`LayergradError` subclasses keyed by gRPC status code (see
:mod:`layergrad.errors`); losses live in :mod:`layergrad.losses`.
"""

from layergrad._explain import ExplainedTarget, Explanation
from layergrad.client import (
    Client,
    GradientResult,
    InputSpec,
    LayerInfo,
    ModelInfo,
    ModelStatus,
    ParameterInfo,
    Pattern,
    Prediction,
    TopClass,
    WeightsInfo,
)
from layergrad.errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    ClientClosedError,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    LayergradError,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
    from_grpc_error,
)
from layergrad.losses import (
    ClassScore,
    Loss,
    SoftmaxCrossEntropy,
    SquaredError,
    SumOfSquares,
    UpstreamGradient,
)
from layergrad.memory import keep_freed_memory

__version__ = "0.1.0"

__all__ = [
    "Aborted",
    "AlreadyExists",
    "Cancelled",
    "ClassScore",
    "Client",
    "ClientClosedError",
    "DataLoss",
    "DeadlineExceeded",
    "ExplainedTarget",
    "Explanation",
    "FailedPrecondition",
    "GradientResult",
    "InputSpec",
    "Internal",
    "InvalidArgument",
    "LayerInfo",
    "LayergradError",
    "Loss",
    "ModelInfo",
    "ModelStatus",
    "NotFound",
    "OutOfRange",
    "ParameterInfo",
    "Pattern",
    "PermissionDenied",
    "Prediction",
    "ResourceExhausted",
    "SoftmaxCrossEntropy",
    "SquaredError",
    "SumOfSquares",
    "TopClass",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "UpstreamGradient",
    "WeightsInfo",
    "__version__",
    "from_grpc_error",
    "keep_freed_memory",
]
