//! Binary encoding of everything Tally stores or sends between peers:
//! postcard over serde — compact, no field names, no JSON on any path.

use serde::{de::DeserializeOwned, Serialize};

use super::StorageError;

pub fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, StorageError> {
    Ok(postcard::to_stdvec(value)?)
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StorageError> {
    Ok(postcard::from_bytes(bytes)?)
}
