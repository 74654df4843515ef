//! unet (to be written).
