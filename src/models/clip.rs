//! clip (to be written).
