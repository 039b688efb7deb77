"""Per-architecture registrations: which classes of a codebase bind to which 2D ops
(one file per architecture, the way torchtitan keeps ``models/<arch>/``)."""
