//! IoT Hub's error vocabulary: the named error codes, their numeric codes and HTTP statuses, and
//! [`HubError`], the one error type hub operations return.
//!
//! Protocol front ends translate a [`HubError`] into their own terms: HTTP answers with the status,
//! the `iothub-errorcode` header and IoT Hub's legacy body (see [`HubError::body`]); MQTT and AMQP map
//! the [`ErrorCode`] to a CONNACK code or an AMQP condition.

use std::fmt;

/// An IoT Hub error code (reference §2.9).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// 400: a request argument is invalid.
    ArgumentInvalid,
    /// 400: the request body or a header is malformed.
    IotHubFormatError,
    /// 400: a bulk request names a device twice.
    DeviceDefinedMultipleTimes,
    /// 400: the device id is not valid.
    InvalidDeviceId,
    /// 401: the credentials are missing, malformed or do not verify.
    IotHubUnauthorizedAccess,
    /// 401: the token is valid but not for this operation (expired, wrong scope or right).
    IotHubUnauthorized,
    /// 403: the device's C2D queue holds 50 messages already.
    DeviceMaximumQueueDepthExceeded,
    /// 403: `iothub-expiry` is too far in the future.
    InvalidMessageExpiryTime,
    /// 403: the device is disabled.
    DeviceDisabled,
    /// 403: the hub holds as many devices as it may.
    IotHubQuotaExceeded,
    /// 404: no such device.
    DeviceNotFound,
    /// 404: the device is not connected (direct methods).
    DeviceNotOnline,
    /// 404: no such module on the device (404010).
    ModuleNotFound,
    /// 404: no such route.
    NotFound,
    /// 404: no scheduled job with this id (404002).
    JobNotFound,
    /// 409: the device exists already.
    DeviceAlreadyExists,
    /// 409: the module exists already on the device (409301).
    ModuleAlreadyExistsOnDevice,
    /// 409: a scheduled job with this id exists already (IoT Hub's numeric code is unconfirmed).
    JobAlreadyExists,
    /// 412: the etag in `If-Match` does not match.
    PreconditionFailed,
    /// 412: the lock token is unknown or its lock has lapsed.
    DeviceMessageLockLost,
    /// 413: the message is larger than IoT Hub allows.
    MessageTooLarge,
    /// 413: too many devices in one request.
    TooManyDevices,
    /// 413: the device holds as many modules as IoT Hub allows (413003).
    TooManyModulesOnDevice,
    /// 405: the method is not allowed on this route.
    MethodNotAllowed,
    /// 429: as many jobs as the hub allows are scheduled or running already (429004).
    ThrottlingMaxActiveJobCountExceeded,
    /// 429: the operation is over its tier's rate and the shaping backlog is full (429001).
    ThrottlingException,
    /// 429: device-to-cloud sends are over the rate and their backlog is full (429002).
    ThrottleBacklogLimitExceeded,
    /// 501: the route exists in IoT Hub but the emulator does not implement it.
    NotImplemented,
    /// 500: an internal error.
    ServerError,
    /// 504: the device did not answer in time.
    GatewayTimeout,
    /// No configuration with that id (reference-2 §6.1; numeric code unconfirmed).
    ConfigurationNotFound,
    /// Creating a configuration whose id exists (reference-2 §6.1; numeric code unconfirmed).
    ConfigurationAlreadyExists,
}

impl ErrorCode {
    /// The code's name as IoT Hub writes it (`iothub-errorcode`, `ErrorCode:<Name>`).
    pub fn name(self) -> &'static str {
        match self {
            Self::ArgumentInvalid => "ArgumentInvalid",
            Self::IotHubFormatError => "IotHubFormatError",
            Self::DeviceDefinedMultipleTimes => "DeviceDefinedMultipleTimes",
            Self::InvalidDeviceId => "ArgumentInvalid",
            Self::IotHubUnauthorizedAccess => "IotHubUnauthorizedAccess",
            Self::IotHubUnauthorized => "IotHubUnauthorized",
            Self::DeviceMaximumQueueDepthExceeded => "DeviceMaximumQueueDepthExceeded",
            Self::InvalidMessageExpiryTime => "InvalidMessageExpiryTime",
            Self::DeviceDisabled => "DeviceDisabled",
            Self::IotHubQuotaExceeded => "IotHubQuotaExceeded",
            Self::DeviceNotFound => "DeviceNotFound",
            Self::DeviceNotOnline => "DeviceNotOnline",
            Self::ModuleNotFound => "ModuleNotFound",
            Self::ModuleAlreadyExistsOnDevice => "ModuleAlreadyExistsOnDevice",
            Self::TooManyModulesOnDevice => "TooManyModulesOnDevice",
            Self::NotFound => "NotFound",
            Self::JobNotFound => "JobNotFound",
            Self::JobAlreadyExists => "JobAlreadyExists",
            Self::ThrottlingMaxActiveJobCountExceeded => "ThrottlingMaxActiveJobCountExceeded",
            Self::ThrottlingException => "ThrottlingException",
            Self::ThrottleBacklogLimitExceeded => "ThrottleBacklogLimitExceeded",
            Self::DeviceAlreadyExists => "DeviceAlreadyExists",
            Self::PreconditionFailed => "PreconditionFailed",
            Self::DeviceMessageLockLost => "DeviceMessageLockLost",
            Self::MessageTooLarge => "MessageTooLarge",
            Self::TooManyDevices => "TooManyDevices",
            Self::MethodNotAllowed => "MethodNotAllowed",
            Self::NotImplemented => "NotImplemented",
            Self::ServerError => "ServerError",
            Self::GatewayTimeout => "GatewayTimeout",
            Self::ConfigurationNotFound => "ConfigurationNotFound",
            Self::ConfigurationAlreadyExists => "ConfigurationAlreadyExists",
        }
    }

    /// IoT Hub's six-digit numeric code.
    pub fn number(self) -> u32 {
        match self {
            Self::ArgumentInvalid | Self::InvalidDeviceId => 400004,
            Self::IotHubFormatError => 400006,
            Self::DeviceDefinedMultipleTimes => 400011,
            Self::IotHubUnauthorizedAccess => 401002,
            Self::IotHubUnauthorized => 401003,
            Self::IotHubQuotaExceeded => 403002,
            Self::DeviceMaximumQueueDepthExceeded => 403004,
            Self::InvalidMessageExpiryTime => 403009,
            Self::DeviceDisabled => 403012,
            Self::DeviceNotFound => 404001,
            Self::NotFound => 404000,
            Self::JobNotFound => 404002,
            Self::JobAlreadyExists => 409000,
            Self::ThrottlingMaxActiveJobCountExceeded => 429004,
            Self::ThrottlingException => 429001,
            Self::ThrottleBacklogLimitExceeded => 429002,
            Self::DeviceNotOnline => 404103,
            Self::ModuleNotFound => 404010,
            Self::ModuleAlreadyExistsOnDevice => 409301,
            Self::TooManyModulesOnDevice => 413003,
            Self::MethodNotAllowed => 405000,
            Self::DeviceAlreadyExists => 409001,
            Self::PreconditionFailed => 412001,
            Self::DeviceMessageLockLost => 412002,
            Self::MessageTooLarge => 413001,
            Self::TooManyDevices => 413002,
            Self::ServerError => 500001,
            Self::NotImplemented => 501000,
            Self::GatewayTimeout => 504101,
            Self::ConfigurationNotFound => 404000,
            Self::ConfigurationAlreadyExists => 409000,
        }
    }

    /// The HTTP status that carries this code.
    pub fn http_status(self) -> u16 {
        (self.number() / 1000) as u16
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An error from a hub operation: an IoT Hub error code and a human-readable message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct HubError {
    /// What went wrong, in IoT Hub's terms.
    pub code: ErrorCode,
    /// Words for the user: what was wrong and, where useful, what is allowed.
    pub message: String,
    /// For throttling and quota refusals: milliseconds until a retry would be accepted (HTTP
    /// answers carry it as `Retry-After`, in whole seconds).
    pub retry_after_ms: Option<u64>,
}

impl HubError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into(), retry_after_ms: None }
    }

    /// A refusal by the tier throttle (see [`crate::throttle`]): `ThrottlingException`,
    /// `ThrottleBacklogLimitExceeded` or `IotHubQuotaExceeded`, with its retry-after.
    pub fn throttled(refusal: &crate::throttle::Refusal, tier: &crate::throttle::Tier) -> Self {
        Self {
            code: refusal.code,
            message: refusal.describe(tier),
            retry_after_ms: Some(refusal.retry_after_ms),
        }
    }

    /// `ModuleNotFound` for module `module_id` of device `device_id`.
    pub fn module_not_found(device_id: &str, module_id: &str) -> Self {
        Self::new(
            ErrorCode::ModuleNotFound,
            format!("Module {module_id} on device {device_id} not registered"),
        )
    }

    /// `DeviceNotFound` for `id`.
    pub fn device_not_found(id: &str) -> Self {
        Self::new(ErrorCode::DeviceNotFound, format!("Device {id} not registered"))
    }

    /// `ArgumentInvalid` with `message`.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::ArgumentInvalid, message)
    }

    /// `IotHubUnauthorizedAccess` with `message`.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::IotHubUnauthorizedAccess, message)
    }

    /// IoT Hub's legacy error body, which the Node, C# and CLI clients all parse:
    /// `{"Message":"ErrorCode:<Name>;<text>","ExceptionMessage":"Tracking ID:<id>-G:0-TimeStamp:<time>"}`.
    pub fn body(&self, tracking_id: &str, timestamp: &str) -> serde_json::Value {
        serde_json::json!({
            "Message": format!("ErrorCode:{};{}", self.code.name(), self.message),
            "ExceptionMessage": format!("Tracking ID:{tracking_id}-G:0-TimeStamp:{timestamp}"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_codes() {
        assert_eq!(ErrorCode::DeviceNotFound.http_status(), 404);
        assert_eq!(ErrorCode::DeviceMaximumQueueDepthExceeded.http_status(), 403);
        assert_eq!(ErrorCode::IotHubUnauthorizedAccess.http_status(), 401);
        assert_eq!(ErrorCode::PreconditionFailed.http_status(), 412);
        assert_eq!(ErrorCode::DeviceAlreadyExists.http_status(), 409);
        assert_eq!(ErrorCode::NotImplemented.http_status(), 501);
        assert_eq!(ErrorCode::ThrottlingException.http_status(), 429);
        assert_eq!(ErrorCode::ThrottleBacklogLimitExceeded.number(), 429002);
        assert_eq!(ErrorCode::IotHubQuotaExceeded.http_status(), 403);
    }

    #[test]
    fn legacy_body_shape() {
        let e = HubError::device_not_found("d1");
        let body = e.body("abc", "t");
        assert_eq!(body["Message"], "ErrorCode:DeviceNotFound;Device d1 not registered");
        assert_eq!(body["ExceptionMessage"], "Tracking ID:abc-G:0-TimeStamp:t");
    }
}
