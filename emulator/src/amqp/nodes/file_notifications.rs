//! The `/messages/serviceBound/filenotifications` node: the service SDKs' file-upload
//! notification receiver. The link is accepted and stays idle: the emulator's file uploads send
//! no notifications on it.

use super::Node;

/// A link the peer receives file notifications on (none are sent).
#[derive(Debug)]
pub struct FileNotifications;

impl Node for FileNotifications {
    fn kind(&self) -> &'static str {
        "filenotifications"
    }
}
