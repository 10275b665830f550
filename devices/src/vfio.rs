//! vfio (to be written)
