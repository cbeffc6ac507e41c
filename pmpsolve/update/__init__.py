"""What an iteration does with a sweep's data: Hamiltonians, maximisers, update rules, optimality, stopping."""
