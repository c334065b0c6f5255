"""HTTP compile steps (pure): Envoy route configurations, RBAC and header
mutations into the tables the L7 runtime (kmesh.l7) matches requests with."""
