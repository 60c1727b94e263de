//! Framing: `[length: u32 big-endian][version: u8][postcard payload]`.
//!
//! The length counts the version byte and the payload. A frame longer than
//! [`FRAME_BYTES_MAX`] is refused before any of it is buffered, an unknown
//! version is refused before the payload is decoded, and a payload that does
//! not decode is an error — never a panic. No I/O here: callers push bytes in
//! and pull messages out.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::wire::PROTOCOL_VERSION;

/// The largest frame accepted or produced (length field value).
pub const FRAME_BYTES_MAX: usize = 4 * 1024 * 1024;

const HEADER_BYTES: usize = 4;

/// Why a frame could not be produced or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The peer announced or we tried to build a frame over the limit; close the stream.
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    Oversized { len: usize, max: usize },
    /// The peer speaks another protocol version; close the stream.
    #[error("unknown protocol version {0} (this side speaks {PROTOCOL_VERSION})")]
    UnknownVersion(u8),
    /// An empty frame has no version byte.
    #[error("empty frame")]
    Empty,
    /// The payload is not a valid message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The stream ended inside a frame.
    #[error("stream ended inside a frame ({0} bytes pending)")]
    Truncated(usize),
}

/// Encodes one message as a frame.
pub fn encode<M: Serialize>(msg: &M) -> Result<Vec<u8>, FrameError> {
    let mut buf = vec![0u8; HEADER_BYTES];
    buf.push(PROTOCOL_VERSION);
    let mut buf =
        postcard::to_extend(msg, buf).map_err(|e| FrameError::Malformed(e.to_string()))?;
    let len = buf.len() - HEADER_BYTES;
    if len > FRAME_BYTES_MAX {
        return Err(FrameError::Oversized {
            len,
            max: FRAME_BYTES_MAX,
        });
    }
    // Invariant: len <= FRAME_BYTES_MAX < u32::MAX.
    buf[..HEADER_BYTES].copy_from_slice(&(len as u32).to_be_bytes());
    Ok(buf)
}

/// The most room a decoder keeps once its buffer is empty, bytes.
const IDLE_BUFFER_BYTES_MAX: usize = 16 * 1024;

/// Decodes frames from a byte stream pushed in pieces.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    /// Set after an error: the stream is unusable.
    failed: bool,
    /// The largest frame this stream may carry (at most [`FRAME_BYTES_MAX`]).
    frame_bytes_max: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new()
    }
}

impl FrameDecoder {
    pub fn new() -> FrameDecoder {
        FrameDecoder::with_limit(FRAME_BYTES_MAX)
    }

    /// A decoder that refuses frames larger than `frame_bytes_max` (capped
    /// at [`FRAME_BYTES_MAX`]) before buffering them: peers that are not yet
    /// authenticated, or streams whose messages are small, get a small limit.
    pub fn with_limit(frame_bytes_max: usize) -> FrameDecoder {
        FrameDecoder {
            buf: Vec::new(),
            failed: false,
            frame_bytes_max: frame_bytes_max.min(FRAME_BYTES_MAX),
        }
    }

    /// Changes the limit for the frames still to come (e.g. after a Hello).
    pub fn set_limit(&mut self, frame_bytes_max: usize) {
        self.frame_bytes_max = frame_bytes_max.min(FRAME_BYTES_MAX);
    }

    /// Appends received bytes.
    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered but not yet decoded.
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Memory the decoder holds for its buffer, bytes.
    pub fn held_bytes(&self) -> usize {
        self.buf.capacity()
    }

    /// The next complete message, `Ok(None)` if more bytes are needed. After
    /// an error every further call fails too: close the stream.
    pub fn next_message<M: DeserializeOwned>(&mut self) -> Result<Option<M>, FrameError> {
        if self.failed {
            return Err(FrameError::Malformed("stream already failed".into()));
        }
        let r = self.next_inner();
        if r.is_err() {
            self.failed = true;
            self.buf.clear();
        }
        r
    }

    fn next_inner<M: DeserializeOwned>(&mut self) -> Result<Option<M>, FrameError> {
        let Some(header) = self.buf.get(..HEADER_BYTES) else {
            return Ok(None);
        };
        let mut len_bytes = [0u8; HEADER_BYTES];
        len_bytes.copy_from_slice(header);
        let len = u32::from_be_bytes(len_bytes) as usize;
        if len > self.frame_bytes_max {
            return Err(FrameError::Oversized {
                len,
                max: self.frame_bytes_max,
            });
        }
        if len == 0 {
            return Err(FrameError::Empty);
        }
        let version = match self.buf.get(HEADER_BYTES) {
            Some(v) => *v,
            None => return Ok(None),
        };
        if version != PROTOCOL_VERSION {
            return Err(FrameError::UnknownVersion(version));
        }
        if self.buf.len() < HEADER_BYTES + len {
            return Ok(None);
        }
        let payload = &self.buf[HEADER_BYTES + 1..HEADER_BYTES + len];
        let msg =
            postcard::from_bytes(payload).map_err(|e| FrameError::Malformed(e.to_string()))?;
        self.buf.drain(..HEADER_BYTES + len);
        if self.buf.is_empty() && self.buf.capacity() > IDLE_BUFFER_BYTES_MAX {
            // A large frame passed: an idle stream does not keep its room
            // (a session that once took a 1 MiB batch would hold 1 MiB).
            self.buf = Vec::new();
        }
        Ok(Some(msg))
    }

    /// Call at end of stream: an error if a partial frame is left.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated(self.buf.len()))
        }
    }
}
