import { URLExt } from '@jupyterlab/coreutils';
import { ServerConnection } from '@jupyterlab/services';

/**
 * Call a route of the dicomlake server extension (`<base_url>/dicomlake/<endPoint>`).
 *
 * Errors keep the server's message: a failed request raises `ResponseError` carrying the
 * handler's `message` (e.g. "Jupyter user ... is not mapped"), so the UI can show it as is.
 */
export async function requestAPI<T>(
  endPoint = '',
  init: RequestInit = {},
  settings: ServerConnection.ISettings = ServerConnection.makeSettings()
): Promise<T> {
  const url = URLExt.join(settings.baseUrl, 'dicomlake', endPoint);
  let response: Response;
  try {
    response = await ServerConnection.makeRequest(url, init, settings);
  } catch (error) {
    throw new ServerConnection.NetworkError(error as TypeError);
  }
  const text = await response.text();
  let data: unknown = text;
  if (text.length > 0) {
    try {
      data = JSON.parse(text);
    } catch {
      console.error('dicomlake: response is not JSON', response.url, text);
    }
  }
  if (!response.ok) {
    throw new ServerConnection.ResponseError(response, failureMessage(data));
  }
  return data as T;
}

/**
 * The message of a failed response: the handler's `message`, else the body as text; none
 * for an empty body, so `ResponseError` says which status came back instead of nothing.
 */
function failureMessage(data: unknown): string | undefined {
  if (typeof data === 'object' && data !== null && 'message' in data) {
    const message = data.message;
    if (typeof message === 'string' && message) {
      return message;
    }
  }
  if (data === '') {
    return undefined;
  }
  return typeof data === 'string' ? data : JSON.stringify(data);
}
