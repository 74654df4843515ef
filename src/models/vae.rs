//! vae (to be written).
