"""Nova's error responses: `{"<kind>": {"message": ..., "code": N}}` as application/json.

`ApiError` is what handlers raise; `refusal` turns the controller's refusal
(`OperationError`) into the status Nova gives the same refusal.
"""
from __future__ import annotations

KINDS = {400: "badRequest", 401: "unauthorized", 403: "forbidden", 404: "itemNotFound",
         405: "badMethod", 406: "notAcceptable", 409: "conflictingRequest",
         413: "overLimit", 415: "badMediaType", 500: "computeFault",
         501: "notImplemented", 503: "serviceUnavailable"}


class ApiError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def body(self) -> dict:
        return {KINDS.get(self.code, "computeFault"): {"message": self.message,
                                                      "code": self.code}}


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)


def unexpected_properties(names) -> ApiError:
    """Nova's 400 for fields its request schema does not allow, worded as jsonschema
    words it: `Additional properties are not allowed ('a', 'b' were unexpected)`."""
    names = sorted(names)
    return bad_request(f"Additional properties are not allowed "
                       f"({', '.join(map(repr, names))} "
                       f"{'was' if len(names) == 1 else 'were'} unexpected)")


def not_found(message: str) -> ApiError:
    return ApiError(404, message)


def conflict(message: str) -> ApiError:
    return ApiError(409, message)


def forbidden(action: str) -> ApiError:
    return ApiError(403, f"Policy doesn't allow {action} to be performed.")


# The controller's refusals, by what their message starts with or says.
_NOT_FOUND = ("no instance named", "no instance with uuid", "no migration", "no flavor with")
_BAD = ("unknown flavor", "unknown host", "--host ")


def refusal(message: str) -> ApiError:
    """The status for an OperationError raised by the cluster."""
    if message.startswith(_NOT_FOUND):
        return not_found(message)
    if message.startswith(_BAD) or "no valid host" in message:
        return bad_request(message)
    return conflict(message)
