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
  let data: any = text;
  if (text.length > 0) {
    try {
      data = JSON.parse(text);
    } catch (error) {
      console.error('dicomlake: response is not JSON', response.url, text);
    }
  }
  if (!response.ok) {
    throw new ServerConnection.ResponseError(response, data?.message || data);
  }
  return data as T;
}
