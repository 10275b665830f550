//! i8042 (to be written)
