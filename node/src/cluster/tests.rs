//! Tests of the cluster core on a simulated federation.
