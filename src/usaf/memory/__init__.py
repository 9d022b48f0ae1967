"""The memory planner (counts -> sizes -> phase -> plan -> report), its run-time policy, the frozen-prefix cache."""
