"""pyoco's core: models (Task, Flow, states), the Context and the Engine (on tokiwa's Runner)."""
