"""OpenAI wire types (pydantic), one module per endpoint family."""
