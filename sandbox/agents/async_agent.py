"""The async-agents tutorial's shape: the entrypoint starts background work with add_async_task, answers at
once, and completes the task later. Meanwhile /ping says HealthyBusy, so the session is not idle."""
import threading
import time

from bedrock_agentcore.runtime import BedrockAgentCoreApp

app = BedrockAgentCoreApp()
finished = []


def background_work(task_id, seconds):
    time.sleep(seconds)
    finished.append(task_id)
    app.complete_async_task(task_id)


@app.entrypoint
def invoke(payload):
    if payload.get("action") == "status":
        return {"finished": finished, "tasks": app.get_async_task_info(), "ping": app.get_current_ping_status().value}
    seconds = float(payload.get("seconds", 5))
    task_id = app.add_async_task("background_work", {"seconds": seconds})
    threading.Thread(target=background_work, args=(task_id, seconds), daemon=True).start()
    return {"started": task_id, "seconds": seconds}


if __name__ == "__main__":
    app.run()
