"""The problem the policy learns: answer format, answers, data, synthetic problems, rewards. Pure Python."""
